"""Item 3: model FLOP utilization of a stage-1 training step (ITC + ITM + ITG, cached image features).

FLOPs of one forward+backward are counted by common.flop_counter (torch's FlopCounterMode: matmuls
and attention, the CPU flash-attention kernel included; element-wise ops count 0, so MFU is the matmul
share of the step's work); the step is timed with the AdamW update included. The peak is measured in
the same run (common.matmul_peak): the median rate of a large square matmul (fp32, and bf16 where the
CPU runs it; the fp32 peak is the faster of MKL and oneDNN), so MFU = achieved / measured peak of the
dtype the step runs in: fp32, or bf16-mixed (`torch.autocast("cpu", torch.bfloat16)`, what
trainer.precision=bf16-mixed runs) against the bf16 peak.

Two models: the embedded default (configs/schema.py ModelConfig._tiny_qformer over tiny-conv
features, batch 32 as TrainConfig) and a BLIP-2-size Q-Former (12 x 768, 32 queries, 257 x 1408
image tokens) at batch 2 (scaled down from BLIP-2's per-GPU batch for CPU time).
Target: >= 50 % of the peak of the dtype used. The bf16 rows also show whether bf16-mixed pays at each
size (the step-time ratio fp32 / bf16): what trainer.precision=auto decides by a short measurement.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import replace

import torch
from common import add_thread_arg, flop_counter, footer, header, matmul_peak, median_time, table, verdict

from expvl.configs.schema import ModelConfig
from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.kernel_choice import cpu_info
from expvl.models.qformer import QFormerConfig
from expvl.models.vision import VisionEncoder


def stage1_step(model: Blip2, opt, features, ids, mask, count: bool = False) -> int:
    """One training step; returns the FLOPs of forward+backward when `count`."""
    counter = flop_counter() if count else None
    if counter:
        counter.__enter__()
    out = model.stage1_losses(model.embed_features(features), ids, mask, dec_token_id=2, pad_token_id=0,
                              generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    if counter:
        counter.__exit__(None, None, None)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return counter.get_total_flops() if counter else 0


def measure(name: str, qcfg: QFormerConfig, vision: VisionEncoder | None, width: int, N: int, B: int, T: int,
            repeats: int, adamw: str = "loop", dtype: str = "fp32") -> dict:
    cfg = Blip2Config(stage="pretrain", qformer=qcfg)
    model = Blip2(cfg, vision=vision if vision is not None else _FixedWidth(width))
    model.train()
    params = [p for n, p in model.named_parameters() if not n.startswith("vision.")]
    # models/optim.py trains with the per-tensor loop (AdamW's CPU default); this script times it against
    # fused / foreach
    opt = torch.optim.AdamW(params, lr=1e-5, fused=adamw == "fused", foreach=adamw == "foreach")
    g = torch.Generator().manual_seed(0)
    features = torch.randn(B, N, width, generator=g)
    ids = torch.randint(3, qcfg.vocab_size, (B, T), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(B, T, dtype=torch.long)
    mask[B // 2:, T // 2:] = 0  # half the captions are shorter
    with autocast(dtype):
        stage1_step(model, opt, features, ids, mask)  # warm-up: kernel choices are measured here, not counted
        flops = stage1_step(model, opt, features, ids, mask, count=True)
        t = median_time(lambda: stage1_step(model, opt, features, ids, mask), repeats=repeats, warmup=0)
    return {"name": f"{name}, {dtype}", "B": B, "flops": flops, "time": t, "dtype": dtype}


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


class _FixedWidth(torch.nn.Module):
    """Stand-in encoder for cached features: only its `width` is read (features bypass it)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--blip2-batch", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="run the bf16 rows even on a CPU without bf16 units")
    add_thread_arg(ap)
    args = ap.parse_args()
    header("bench_mfu: stage-1 training step FLOP utilization vs the measured matmul peak", args.threads)
    has_bf16 = cpu_info().bf16 or args.bf16
    # bf16 runs far slower than fp32 on a CPU without AVX512-BF16/AMX: a smaller product keeps it short
    peaks = {"fp32": matmul_peak(torch.float32),
             "bf16": matmul_peak(torch.bfloat16) if has_bf16 else matmul_peak(torch.bfloat16, n=512, products=1,
                                                                               repeats=3)}

    mcfg = ModelConfig()
    vision = VisionEncoder(mcfg.vision)
    with torch.no_grad():
        tokens = vision(torch.zeros(1, 3, mcfg.vision.image_size, mcfg.vision.image_size))
    N_tiny, W_tiny = tokens.shape[1], tokens.shape[2]
    tiny = replace(mcfg.qformer, encoder_width=W_tiny)
    runs = [measure(f"default (_tiny_qformer), AdamW {kind}", tiny, vision, W_tiny, N_tiny, 32, 32, args.repeats,
                    adamw=kind) for kind in ("loop", "foreach", "fused")]
    if has_bf16:
        runs.append(measure("default (_tiny_qformer), AdamW loop", tiny, vision, W_tiny, N_tiny, 32, 32,
                            args.repeats, dtype="bf16"))
    blip2 = QFormerConfig.from_name("blip2")
    for dtype in ("fp32", "bf16") if has_bf16 else ("fp32",):
        runs.append(measure("BLIP-2-size Q-Former, AdamW loop", blip2, None, 1408, 257, args.blip2_batch, 32,
                            max(1, args.repeats - 1), dtype=dtype))
    rows = []
    fp32_time = {r["name"].removesuffix(", fp32"): r["time"] for r in runs if r["dtype"] == "fp32"}
    for r in runs:
        rate = r["flops"] / r["time"]
        r["mfu"] = rate / peaks[r["dtype"]]
        gain = fp32_time.get(r["name"].removesuffix(", bf16")) if r["dtype"] == "bf16" else None
        rows.append([r["name"], r["B"], r["flops"] / 1e9, r["time"] * 1e3, rate / 1e9, f"{100 * r['mfu']:.1f}%",
                     f"{gain / r['time']:.2f}x" if gain else "-"])
    print(f"matmul peak (1024^3): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    print(table(rows, ["model, dtype", "B", "GFLOP/step", "ms/step", "GFLOP/s", "MFU (own dtype's peak)",
                       "bf16 speed-up"]))
    for r in runs:
        print(verdict(f"MFU {r['name']}", r["mfu"], f">= 0.5 of the {r['dtype']} peak", r["mfu"] >= 0.5))
    footer()


if __name__ == "__main__":
    main()
