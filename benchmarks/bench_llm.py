"""Item 2: the LLM, ours (models/llm.py + models/generation.py) vs transformers `LlamaForCausalLM`.

A 134M-parameter LLaMA (dim 768, 12 layers, 12 heads, SwiGLU 2048, vocab 32000), random weights
saved by HF and loaded through models/convert/llama.py, so both hold the same weights.
- prefill: one forward over (B, T) prompts, full logits (what a training/scoring pass computes);
- generation: greedy decoding of 64 new tokens at batch 4 with a KV cache (HF `generate`,
  use_cache=True, EOS disabled so both make exactly 64 tokens); the greedy ids are compared.

Targets: prefill time ours/HF <= 1.0; generation tokens/s ours/HF >= 1.5.
Also measured: ours with int8 linear weights (models/llm_int8.py, for a frozen LLM on CPU), the fix
for decoding being weight-bandwidth bound; its greedy ids are compared with the fp32 ones.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import add_thread_arg, footer, header, interleaved_times, table, verdict

from expvl.models.convert.llama import load_hf_llama
from expvl.models.generation import GenerationConfig, generate
from expvl.models.llm_int8 import int8_linears

HF_CONFIG = {"vocab_size": 32000, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 2048, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "bos_token_id": 1,
             "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prefill-len", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    add_thread_arg(ap)
    args = ap.parse_args()
    header("bench_llm: 134M LLaMA, ours vs transformers LlamaForCausalLM", args.threads)
    import transformers
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_hf_llama(folder).eval()
    n_params = sum(p.numel() for p in ours.parameters())
    ours_int8 = int8_linears(ours)
    B = args.batch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (B, args.prefill_len), generator=g)
    prompt = torch.randint(3, 32000, (B, args.prompt_len), generator=g)
    mask = torch.ones_like(prompt)

    with torch.no_grad():
        diff = (ours(input_ids=ids)["logits"] - hf(input_ids=ids).logits).abs().max().item()
        pre = interleaved_times({"ours": lambda: ours(input_ids=ids),
                                 "hf": lambda: hf(input_ids=ids, use_cache=False)}, repeats=args.repeats)

    cfg = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
    out = {}

    def ours_gen():
        out["ours"] = generate(ours, input_ids=prompt, attention_mask=mask, config=cfg)["sequences"]

    def int8_gen():
        out["int8"] = generate(ours_int8, input_ids=prompt, attention_mask=mask, config=cfg)["sequences"]

    def hf_gen():
        with torch.no_grad():
            out["hf"] = hf.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=args.new_tokens,
                                    min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                                    pad_token_id=0)[:, prompt.shape[1]:]

    gen = interleaved_times({"ours": ours_gen, "int8": int8_gen, "hf": hf_gen}, repeats=max(2, args.repeats - 1))
    same = torch.equal(out["ours"], out["hf"])
    agree = (out["int8"] == out["ours"]).float().mean().item()
    tok = B * args.new_tokens
    pre_ratio = pre["ours"] / pre["hf"]
    gen_ratio = (tok / gen["ours"]) / (tok / gen["hf"])
    int8_ratio = gen["hf"] / gen["int8"]
    print(f"{n_params / 1e6:.0f}M parameters; prefill B={B} T={args.prefill_len}; generation B={B}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens; medians of interleaved runs")
    print(table([["prefill (ms)", pre["ours"] * 1e3, pre["hf"] * 1e3, pre_ratio, f"logits |diff| {diff:.1e}"],
                 ["generate (tokens/s)", tok / gen["ours"], tok / gen["hf"], gen_ratio, f"greedy ids equal: {same}"],
                 ["generate, ours int8 (tokens/s)", tok / gen["int8"], tok / gen["hf"], int8_ratio,
                  f"ids equal to fp32: {100 * agree:.0f} %"]],
                ["measure", "ours", "HF", "ratio", "check"]))
    print(verdict("prefill time ours/HF", pre_ratio, "<= 1.0", pre_ratio <= 1.0))
    print(verdict("generation tokens/s ours/HF", gen_ratio, ">= 1.5", gen_ratio >= 1.5))
    print(verdict("generation tokens/s ours int8/HF fp32", int8_ratio, ">= 1.5", int8_ratio >= 1.5))
    orientation(repeats=args.repeats)
    footer()


def orientation(*, repeats: int) -> None:
    """Why ours decodes faster: F.linear (x W^T, what transformers runs) against models.llm `linear`
    ((W x^T)^T for 2-8 rows) at decode shapes, weights larger than the caches (read from memory)."""
    from expvl.models.llm import linear

    heads = [torch.randn(32000, 768)]                    # the lm_head: 98 MB
    mlps = [torch.randn(2048, 768) for _ in range(40)]   # 40 MLP-sized matrices: 252 MB
    rows = []
    for n in (1, 2, 4, 8, 16):
        x = torch.randn(n, 768)
        for name, ws in (("lm_head 32000x768", heads), ("40 x (2048x768)", mlps)):
            with torch.no_grad():
                t = interleaved_times({"F.linear": lambda x=x, ws=ws: [torch.nn.functional.linear(x, w) for w in ws],
                                       "linear": lambda x=x, ws=ws: [linear(x, w) for w in ws]}, repeats=repeats)
            gb = sum(w.numel() * 4 for w in ws) / 1e9
            rows.append([f"{name}, {n} rows", t["F.linear"] * 1e3, t["linear"] * 1e3, t["F.linear"] / t["linear"],
                         f"{gb / t['linear']:.1f}"])
    print("\nlinear layers at decode shapes (ms): F.linear = x W^T, linear = models/llm.py (W x^T for 2-8 rows)")
    print(table(rows, ["weights, input rows", "F.linear", "linear", "speed-up", "linear GB/s"]))


if __name__ == "__main__":
    main()
