"""Item 5: AU yes/no evaluation throughput, scoring path vs free generation (Exp-VQA Q3).

A tiny random stage-3 model (models/blip2.py, stage "instruct": the embedded default's Q-Former
and the bootstrap LLM of configs/schema.py) answers the 19 SynthFACS AU questions for every image
of a face set, in batches of 64 rows as eval.py does, from cached image features:
- scoring: `Blip2.score_answers` with candidates "yes"+EOS / "no"+EOS (one prompt pass, then the
  candidates on a copied KV cache) -- evaluation/answerer.py `Answerer.score_yes_no`;
- generation: greedy `Blip2.generate` with max_new_tokens=4 as evaluation/vqa.py uses for the same
  questions (random weights never emit EOS, so every row makes 4 tokens; a trained model stops
  after "yes"/"no" + EOS, i.e. 2 tokens, which `--new-tokens 2` shows).
Question/prompt token ids are random, with lengths typical of the Q3 templates. The ratio
(scoring images/s over generation images/s) is what matters.
"""

from __future__ import annotations

import argparse

import torch
from common import add_thread_arg, footer, header, interleaved_times, table

from expvl.configs.schema import BootstrapConfig, ModelConfig
from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.generation import GenerationConfig
from expvl.vocab.facs import SYNTHFACS_AUS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16, help="faces in the set")
    ap.add_argument("--batch", type=int, default=64, help="rows (image, question) per call, as eval.py")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    add_thread_arg(ap)
    args = ap.parse_args()
    header("bench_eval: 19-AU yes/no, score_candidates vs greedy generation", args.threads)
    mcfg, boot = ModelConfig(), BootstrapConfig()
    torch.manual_seed(0)
    model = Blip2(Blip2Config(stage="instruct", vision=mcfg.vision, qformer=mcfg.qformer, llm=boot.llm,
                              embed_dim=mcfg.embed_dim)).eval()
    with torch.no_grad():
        tokens = model.vision(torch.zeros(1, 3, mcfg.vision.image_size, mcfg.vision.image_size))
    A = len(SYNTHFACS_AUS)
    rows = args.images * A
    g = torch.Generator().manual_seed(1)
    feats = model.embed_features(torch.randn(args.images, tokens.shape[1], tokens.shape[2], generator=g))
    feats = feats.repeat_interleave(A, 0)  # (images * 19, N, Dv): every question of an image
    q_ids = torch.randint(5, mcfg.qformer.vocab_size, (rows, 14), generator=g)  # Q-Former question
    q_mask = torch.ones_like(q_ids)
    p_ids = torch.randint(4, boot.llm.vocab_size, (rows, 16), generator=g)  # LLM prompt, left padded
    p_mask = torch.ones_like(p_ids)
    p_mask[::3, :3] = 0
    p_ids[p_mask == 0] = 3
    yes, no, eos = 10, 11, 2
    gen_cfg = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=3)
    chunks = [slice(i, i + args.batch) for i in range(0, rows, args.batch)]

    @torch.no_grad()
    def scoring():
        for c in chunks:
            model.score_answers(feats[c], p_ids[c], p_mask[c], [[yes, eos], [no, eos]],
                                instruction_ids=q_ids[c], instruction_mask=q_mask[c])

    @torch.no_grad()
    def generation():
        for c in chunks:
            model.generate(feats[c], p_ids[c], p_mask[c], gen_cfg, instruction_ids=q_ids[c],
                           instruction_mask=q_mask[c])

    t = interleaved_times({"scoring": scoring, "generation": generation}, repeats=args.repeats)
    ips = {k: args.images / v for k, v in t.items()}
    print(f"{args.images} faces x {A} AU questions = {rows} rows, batches of {args.batch}; generation "
          f"{args.new_tokens} new tokens; median of {args.repeats} interleaved runs")
    print(table([["scoring (score_candidates)", t["scoring"] * 1e3, ips["scoring"]],
                 ["generation (greedy)", t["generation"] * 1e3, ips["generation"]]],
                ["path", "ms / face set", "images/s"]))
    print(f"scoring / generation images/s: {ips['scoring'] / ips['generation']:.2f}x (no fixed target)")
    footer()


if __name__ == "__main__":
    main()
