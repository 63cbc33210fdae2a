"""Stage-3 training steps with and without length-grouped batches (`stage3.group_by_length`).

Reads a finished embedded-default run (default `runs/default`: its data, tokenizers, LLM, feature
cache and stage-1/2 checkpoints), builds the stage-3 model as the pipeline does, and times the same
number of optimizer steps over the real stage-3 stream (cached features, the run's VQA mix) with
`group_by_length=0` and with `--group` batches per window. Prints s/step, the mean padded LLM length
per batch and the speedup. No target: it measures the speed-up behind the default's choice.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from common import add_thread_arg, footer, header, table

from expvl.datamodules.collate import InstructCollate, vqa_samples
from expvl.datamodules.stream import StreamDataset
from expvl.models.optim import OptimConfig, build_optimizer
from expvl.training.lit_base import freeze
from expvl.training.runs import Blip2Run, open_run
from expvl.training.stages import STAGES, build_stage_model, trainable


def run_steps(run: Blip2Run, group: int, steps: int, batch: int) -> tuple[float, float]:
    cfg = run.cfg
    torch.manual_seed(0)
    stage = STAGES["instruct"]  # started as the pipeline starts it, from the run's stage-1 and stage-2 checkpoints
    inits = [(run.checkpoint(s), STAGES[s].hands_on) for s in stage.init_from]
    model = build_stage_model(cfg, stage.name, run.tokenizers, run.encoder, run.llm, inits)
    freeze(model, trainable(model))
    model.train()
    opt, _ = build_optimizer(model, OptimConfig(lr=5e-4), total_steps=steps)
    stream = StreamDataset(run.data_root, split="train", expand=vqa_samples(cfg.stage3.vqa_types),
                           config=replace(cfg.data.stream, group_by_length=group))
    collate = InstructCollate(run.tokenizers["qformer"], run.tokenizers["llm"], cfg.text, run.features)
    it = iter(stream.loader(batch_size=batch, collate_fn=collate))
    lengths, t0 = [], None
    for step in range(steps + 3):
        if step == 3:  # the first batches warm allocators and the reader
            t0 = time.perf_counter()
        b = next(it)
        lengths.append(b["llm_ids"].shape[1])
        out = model.lm_loss(model.embed_features(b["features"]), b["llm_ids"], b["llm_mask"], b["labels"],
                            instruction_ids=b["qf_ids"], instruction_mask=b["qf_mask"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    return (time.perf_counter() - t0) / steps, sum(lengths[3:]) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/default")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    add_thread_arg(ap)
    args = ap.parse_args()
    header("bench_grouping: stage-3 steps, mixed vs length-grouped batches", args.threads)
    run = open_run(args.run)
    plain, plain_len = run_steps(run, 0, args.steps, args.batch)
    grouped, grouped_len = run_steps(run, args.group, args.steps, args.batch)
    print(table([["mixed", plain, plain_len], [f"grouped (k={args.group})", grouped, grouped_len]],
                ["batches", "s/step", "mean padded LLM length"]))
    print(f"speedup grouped vs mixed: {plain / grouped:.2f}x over {args.steps} steps")
    footer()


if __name__ == "__main__":
    main()
