"""Item 4: data pipeline throughput vs what the default training step consumes.

Builds on a small SynthFACS set written beforehand by
    python -m expvl.synthesis synthfacs.n_train=512 synthfacs.n_val=16 synthfacs.n_test=16 \
        synthfacs.size=64 out_dir=/tmp/bench_data
then, in one process (num_workers=0, i.e. the cost on the training process itself):
- delivered: samples/s of StreamDataset -> DataLoader -> PretrainCollate (stage 1 captions) and
  InstructCollate (stage 3 VQA), with images decoded + the tiny-conv `train_transform`, and with
  cached features (FeatureStore lookup, no decoding);
- consumed: samples/s of the default stage-1 training step (ModelConfig defaults, batch 32), on
  cached features, and on images (frozen tiny-conv forward + step).
Target: delivered / consumed >= 5 for each matching pair.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import add_thread_arg, footer, header, median_time, table, verdict

from expvl.configs.schema import ModelConfig
from expvl.datamodules.collate import (
    InstructCollate,
    PretrainCollate,
    TextConfig,
    caption_samples,
    vqa_samples,
)
from expvl.datamodules.features import FeatureStore
from expvl.datamodules.stream import StreamConfig, StreamDataset
from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.tokenizer import QFormerTokenizer, SPTokenizer
from expvl.vocab.shards import read_split_records


def delivered(root: Path, expand, collate, transform, batch: int, max_batches: int) -> float:
    """Samples/s of one pass over the first `max_batches` batches (after the index is built)."""
    stream = StreamDataset(root, split="train", config=StreamConfig(shuffle=True, seed=0), transform=transform,
                           expand=expand)
    loader = stream.loader(batch_size=batch, collate_fn=collate)
    n, t0 = 0, time.perf_counter()
    for i, b in enumerate(loader):
        n += len(b["records"])
        if i + 1 == max_batches:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/tmp/bench_data")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    add_thread_arg(ap)
    args = ap.parse_args()
    header("bench_data: datamodule samples/s vs default stage-1 step samples/s", args.threads)
    root = Path(args.data)
    if not (root / "manifest.json").exists():
        raise SystemExit(f"{root} has no manifest.json; build it first (see this file's docstring)")
    records = read_split_records(root)["train"]
    kinds = sorted({k for r in records for k in r.captions})
    types = sorted({p.type for r in records for p in r.vqa})
    captions = [t for r in records for t in r.captions.values()]
    texts = captions + [p.question for r in records for p in r.vqa] + [p.answer for r in records for p in r.vqa]

    mcfg = ModelConfig()
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    qtok = QFormerTokenizer.train_sentencepiece(texts, tmp / "qformer.model", vocab_size=mcfg.qformer.vocab_size)
    ltok = SPTokenizer.train(texts, tmp / "llm.model", vocab_size=1000)
    model = Blip2(Blip2Config(stage="pretrain", vision=mcfg.vision,
                              qformer=replace(mcfg.qformer, vocab_size=qtok.vocab_size), embed_dim=mcfg.embed_dim))
    vision = model.vision.eval()
    store = FeatureStore.build(vision, vision.eval_transform, [(r, root) for r in records], tmp, progress=False)
    text = TextConfig()

    B = args.batch
    pipelines = {
        "stage1 captions, images": (caption_samples(kinds), PretrainCollate(qtok, text), vision.train_transform),
        "stage1 captions, cached features": (caption_samples(kinds), PretrainCollate(qtok, text, store), None),
        "stage3 VQA, images": (vqa_samples(types), InstructCollate(qtok, ltok, text), vision.train_transform),
        "stage3 VQA, cached features": (vqa_samples(types), InstructCollate(qtok, ltok, text, store), None),
    }
    rates = {}
    for name, (expand, collate, transform) in pipelines.items():
        runs = [delivered(root, expand, collate, transform, B, args.max_batches) for _ in range(args.repeats)]
        rates[name] = sorted(runs)[len(runs) // 2]

    # the consumer: the default stage-1 step on one batch of the real collated data
    batch = next(iter(StreamDataset(root, split="train", transform=vision.train_transform,
                                    expand=caption_samples(kinds)).loader(batch_size=B,
                                                                          collate_fn=PretrainCollate(qtok, text))))
    ids, mask = batch["qf_ids"], batch["qf_mask"]
    feats = store.lookup([r.id for r in batch["records"]])
    model.train()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("vision.")], lr=1e-5)

    def step(image_embeds_fn):
        out = model.stage1_losses(image_embeds_fn(), ids, mask, dec_token_id=qtok.dec_id, pad_token_id=0,
                                  generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def from_images():
        with torch.no_grad():
            tokens = vision(batch["images"])
        return model.ln_vision(tokens.float())

    consumed = {"cached features": B / median_time(lambda: step(lambda: model.embed_features(feats)),
                                                   repeats=args.repeats),
                "images": B / median_time(lambda: step(from_images), repeats=args.repeats)}
    rows, verdicts = [], []
    for name, rate in rates.items():
        kind = "images" if name.endswith("images") else "cached features"
        ratio = rate / consumed[kind]
        rows.append([name, rate, consumed[kind], ratio])
        verdicts.append(verdict(f"delivered/consumed {name}", ratio, ">= 5", ratio >= 5))
    print(f"{len(records)} train records, batch {B}, {args.max_batches} batches per pass, num_workers=0; "
          f"median of {args.repeats}; consumer: default stage-1 step (ITC+ITM+ITG + AdamW)")
    print(table(rows, ["pipeline", "delivered samples/s", "step samples/s", "ratio"]))
    print("\n".join(verdicts))
    footer()


if __name__ == "__main__":
    main()
