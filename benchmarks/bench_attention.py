"""Item 7: attention backends of models/attention.py on CPU, `sdpa` vs `math`, forward and forward+backward.

Shapes (B, H, Tq, Tk, hd) of the two users: the BLIP-2 Q-Former (self-attention over 32 queries +
32 text tokens under a bool mask, cross-attention of 32 queries to 257 image tokens) and the
134M LLaMA of bench_llm.py (causal prefill; one decode step against a 256-token KV cache; the
GQA variant with 4 KV heads). xformers (`backend="xformers"`) has CUDA kernels only: on a GPU run
`python benchmarks/bench_attention.py --device cuda --backends xformers sdpa math`; here it is
not importable and `auto` runs sdpa or math, whichever models/kernel_choice.py measured faster for
the call (column "auto": its choice, made afresh in this run). Each case runs in fp32 and, where the
CPU has bf16 units (or with --dtypes fp32 bf16), in bf16: there torch's CPU sdpa backward is the slow one.
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch
from common import add_thread_arg, footer, header, interleaved_times, table

from expvl.models import kernel_choice
from expvl.models.attention import attention

# name: (B, H, Hkv, Tq, Tk, hd, causal, masked, backward)
CASES = {
    "Q-Former self-attn, mask (64 tok)": (4, 12, 12, 64, 64, 64, False, True, True),
    "Q-Former cross-attn (32 q x 257 img)": (4, 12, 12, 32, 257, 64, False, False, True),
    "LLM prefill causal (T=256)": (4, 12, 12, 256, 256, 64, True, False, True),
    "LLM prefill causal, left padding": (4, 12, 12, 256, 256, 64, True, True, False),
    "LLM decode step (1 x 256 cache)": (4, 12, 12, 1, 256, 64, True, False, False),
    "LLM decode step, GQA 12/4 heads": (4, 12, 4, 1, 256, 64, True, False, False),
}


def step(q, k, v, mask, causal: bool, backward: bool, backend: str) -> torch.Tensor:
    """One attention call (plus its backward when `backward`)."""
    with torch.set_grad_enabled(backward):
        y = attention(q, k, v, mask=mask, causal=causal, backend=backend)
        if backward:
            y.sum().backward()
            q.grad = k.grad = v.grad = None
    return y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", nargs="+", default=["sdpa", "math"])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16"],
                    help="default: fp32, and bf16 where the CPU has AMX-BF16 / AVX512-BF16")
    add_thread_arg(ap)
    args = ap.parse_args()
    header("bench_attention: models.attention backends", args.threads)
    dev = torch.device(args.device)
    dtypes = args.dtypes or (["fp32", "bf16"] if kernel_choice.cpu_info().bf16 else ["fp32"])
    kernel_choice.choices.path = None  # auto's choices measured afresh
    kernel_choice.choices.clear()
    rows = []
    for (name, (B, H, Hkv, Tq, Tk, hd, causal, masked, backward)), dtype in itertools.product(CASES.items(), dtypes):
        g = torch.Generator().manual_seed(0)
        dt = torch.bfloat16 if dtype == "bf16" else torch.float32
        q = torch.randn(B, H, Tq, hd, generator=g).to(dev, dt).requires_grad_(backward)
        k = torch.randn(B, Hkv, Tk, hd, generator=g).to(dev, dt).requires_grad_(backward)
        v = torch.randn(B, Hkv, Tk, hd, generator=g).to(dev, dt).requires_grad_(backward)
        mask = None
        if masked:
            mask = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=dev)
            mask[1::2, ..., : Tk // 8] = False  # left padding / masked text keys in every other row

        calls = {b: partial(step, q, k, v, mask, causal, backward, b) for b in args.backends}
        outs = {b: fn().detach().float() for b, fn in calls.items()}
        diff = max((outs[b] - outs[args.backends[0]]).abs().max().item() for b in args.backends)
        t = interleaved_times(calls, repeats=args.repeats)
        ref = args.backends[-1]
        auto = "-"
        if dev.type == "cpu":
            auto = kernel_choice.cpu_attention_backend(q, k, masked=mask is not None, causal=causal, dropout_p=0.0,
                                                       grad=backward, attend=attention)
        rows.append([name, dtype, "fwd+bwd" if backward else "fwd", *[t[b] * 1e3 for b in args.backends],
                     *[t[b] / t[ref] for b in args.backends[:-1]], auto, f"{diff:.1e}"])
    print(f"device {dev}; median of {args.repeats} interleaved runs; ratio = time / time({args.backends[-1]})")
    print(table(rows, ["case", "dtype", "pass", *[f"{b} ms" for b in args.backends],
                       *[f"{b}/{args.backends[-1]}" for b in args.backends[:-1]], "auto", "max |diff|"]))
    footer()


if __name__ == "__main__":
    main()
