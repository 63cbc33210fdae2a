"""Timing helpers shared by the benchmark scripts (issue 7).

Every figure a script prints is the median of `repeats` timed runs after `warmup` untimed ones,
and every target is a ratio against a reference measured in the same process, so that the load
of other jobs on the (shared, 2-core) machine cancels out as far as possible. No timing is ever
asserted in tests/: the scripts print and exit 0.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def median_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_times(fns: dict[str, Callable[[], object]], *, repeats: int = 5,
                      warmup: int = 1) -> dict[str, float]:
    """Median seconds of several functions timed in alternation (A B A B ...), so that a load spike
    from another process hits all of them alike instead of biasing the ratio."""
    return {name: statistics.median(t) for name, t in interleaved_runs(fns, repeats=repeats, warmup=warmup).items()}


def interleaved_runs(fns: dict[str, Callable[[], object]], *, repeats: int = 5,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Every timed run (seconds) of `interleaved_times`, for the spread of a ratio."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio_spread(runs: dict[str, list[float]], num: str, den: str) -> str:
    """The per-round ratios num/den of interleaved runs as "median (min-max)": round i of both sides
    saw the same load, so the spread of these ratios is the run's own noise."""
    r = sorted(a / b for a, b in zip(runs[num], runs[den]))
    return f"{statistics.median(r):.3f} ({r[0]:.3f}-{r[-1]:.3f})"


def memory_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes/s of reading a tensor larger than the caches (a sum of `mb` MiB of fp32): what a decode
    step, which reads every weight once per token, can reach at best on this thread count."""
    x = torch.ones(mb * 2**20 // 4)
    return x.numel() * 4 / median_time(lambda: x.sum(), repeats=repeats, warmup=1)


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode, also counting the CPU flash-attention kernel that `F.scaled_dot_product_attention`
    runs here (torch registers formulas for the CUDA kernels only, so attention would count 0 FLOPs on CPU)."""
    aten = torch.ops.aten
    forward = aten._scaled_dot_product_flash_attention_for_cpu
    backward = aten._scaled_dot_product_flash_attention_for_cpu_backward
    return FlopCounterMode(display=False, custom_mapping={
        forward: lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        backward: lambda grad, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(grad, q, k, v),
    })


def matmul_peak(dtype: torch.dtype, n: int = 1024, products: int = 10, repeats: int = 5) -> float:
    """FLOP/s of an (n, n) @ (n, n) product in `dtype`, the fastest of `repeats` rounds of `products` products,
    through the faster of torch's matmul (MKL in fp32) and oneDNN's inner product: the machine's peak is
    the best rate any kernel reaches (not the one a model happens to call), and load only lowers it."""
    from expvl.models.kernel_choice import LINEAR_KERNELS, _has_onednn

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    kernels = {"matmul": lambda: [a @ b for _ in range(products)]}
    if _has_onednn() and dtype == torch.float32:
        kernels["oneDNN"] = lambda: [LINEAR_KERNELS["oneDNN"](a, b, None) for _ in range(products)]
    runs = interleaved_runs(kernels, repeats=repeats, warmup=1)
    return products * 2 * n**3 / min(min(t) for t in runs.values())


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def machine() -> str:
    """The CPU model, the instruction sets that decide kernel and precision choices, the load and versions:
    every figure in benchmarks/README.md is labelled with this line's CPU."""
    from expvl.models.kernel_choice import cpu_info

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"CPU {cpu_info().describe()}\n{platform.machine()} {os.cpu_count()} cores, load avg {load}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; python {platform.python_version()}")


def table(rows: list[list[object]], header: list[str]) -> str:
    """A plain fixed-width table (also pasted into benchmarks/README.md)."""
    cells = [[str(c) for c in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(name: str, value: float, target: str, met: bool) -> str:
    return f"{name}: {value:.3g} (target {target}) -> {'MET' if met else 'MISSED'}"


def add_thread_arg(ap) -> None:
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads; 1 by default: on this shared 2-core machine two OpenMP threads "
                         "competing with another job made every op wait for a descheduled thread (20x slower)")


def header(title: str, threads: int) -> None:
    torch.set_num_threads(threads)
    print(f"== {title}\n{machine()}")


def footer() -> None:
    print(f"peak RSS: {peak_rss_mb():.0f} MiB")
