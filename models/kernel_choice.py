"""Kernel choices measured on the machine that runs them, at first use, and cached.

The fastest way to compute the same product differs between CPUs: on an AMD EPYC, MKL's fp32
`x @ W^T` for 2-8 rows reads the weights at half the speed of `(W @ x^T)^T`, while on an Intel
Xeon with AMX the second orientation is the slower one; oneDNN's fp32 linear runs the large
products of a prefill about twice as fast as MKL's on AVX-512 AMD cores. Rather than hard-code
what one machine showed, a code path with several equivalent kernels asks `choose`, which times
every candidate a few times (interleaved, so a load spike from another process hits them alike)
and keeps the default unless another is faster by `margin`: a choice that only noise could flip
stays on the default. The answer is cached per (CPU model, torch version, threads, operation,
shape): in memory, and in a JSON file (`~/.cache/expvl/kernel_choices.json`, or the file named by
EXPVL_KERNEL_CACHE; EXPVL_KERNEL_CACHE=off keeps it in memory only), so that a later process on
the same kind of machine does not measure again.

`cpu_info()` names the CPU and the instruction sets that decide these choices and precision
(AVX2, AVX-512, AVX512-BF16, VNNI, AMX); the benchmarks print it in their headers.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# the flags that change which kernel or precision is fastest, in /proc/cpuinfo spelling
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CPUInfo:
    model: str
    flags: frozenset[str]

    @property
    def bf16(self) -> bool:
        """Whether the CPU has bf16 matrix instructions (AMX-BF16 or AVX512-BF16): without them bf16
        products are emulated and slower than fp32."""
        return bool({"amx_bf16", "avx512_bf16"} & self.flags)

    def describe(self) -> str:
        have = [f for f in RELEVANT_FLAGS if f in self.flags]
        lack = [f for f in RELEVANT_FLAGS if f not in self.flags]
        return f"{self.model}; has {' '.join(have) or '-'}; lacks {' '.join(lack) or '-'}"


@functools.cache
def cpu_info() -> CPUInfo:
    """The CPU model and flags from /proc/cpuinfo (Linux); elsewhere the processor name and no flags."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():  # the first processor's lines are enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine()
    return CPUInfo(model, frozenset(fields.get("flags", "").split()))


def last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """Size of the largest CPU cache (sysfs), so that a measurement of weight streaming can read more
    bytes than the caches hold; `default` where the system does not say."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=default)


Timer = Callable[[str, Callable[[], object]], float]  # (candidate name, call) -> seconds of one call


def wall_clock(name: str, fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _default_path() -> Path | None:
    env = os.environ.get("EXPVL_KERNEL_CACHE", "")
    if env.lower() in ("off", "0", "none"):
        return None
    return Path(env) if env else Path.home() / ".cache" / "expvl" / "kernel_choices.json"


class KernelChoices:
    """Measured choices between equivalent kernels, cached in memory and (when `path`) on disk.

    `timer` times one call of a candidate (tests pass a fake one); `repeats` timed rounds follow one
    untimed warm-up round; a candidate other than the default wins only when the default's median
    is at least `margin` times its own."""

    def __init__(self, path: Path | None = None, *, timer: Timer = wall_clock, repeats: int = 5,
                 margin: float = 1.15):
        self.path, self.timer, self.repeats, self.margin = path, timer, repeats, margin
        self.memory: dict[str, dict] = {}
        self._loaded = False

    def key(self, op: str, shape: tuple) -> str:
        return (f"{op}|{tuple(shape)}|{cpu_info().model}|torch {torch.__version__}|"
                f"{torch.get_num_threads()} threads")

    def lookup(self, op: str, shape: tuple) -> str | None:
        self._load()
        hit = self.memory.get(self.key(op, shape))
        return hit["choice"] if hit else None

    def choose(self, op: str, shape: tuple, candidates: Callable[[], dict[str, Callable[[], object]]],
               default: str) -> str:
        """The name of the fastest candidate for (op, shape). `candidates` builds {name: call} only
        when a measurement is needed (it may allocate inputs); `default` must be one of its names.
        With torch's deterministic algorithms on (`trainer.deterministic`), `default` always: equivalent
        kernels round differently, and a choice measured on a loaded machine could flip between two runs
        that must give the same bytes."""
        if torch.are_deterministic_algorithms_enabled():
            return default
        found = self.lookup(op, shape)
        if found is not None:
            return found
        calls = candidates()
        if default not in calls:
            raise ValueError(f"kernel choice {op}: default {default!r} is not a candidate ({sorted(calls)})")
        medians = self.measure(calls)
        best = min(medians, key=medians.get)
        choice = best if medians[default] >= self.margin * medians[best] else default
        self.memory[self.key(op, shape)] = {"choice": choice, "ms": {k: round(v * 1e3, 4) for k, v in medians.items()}}
        log.info("kernel choice %s %s: %s (median ms %s; margin %.2f)", op, shape, choice,
                 self.memory[self.key(op, shape)]["ms"], self.margin)
        self._save()
        return choice

    def measure(self, calls: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Median seconds of each call over `repeats` interleaved rounds (A B C A B C ...)."""
        for fn in calls.values():
            fn()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(self.repeats):
            for name, fn in calls.items():
                times[name].append(self.timer(name, fn))
        return {name: statistics.median(t) for name, t in times.items()}

    def clear(self) -> None:
        """Forget every choice, in memory (the file is left as it is until the next measurement)."""
        self.memory.clear()
        self._loaded = True

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        self.memory.update(self._read_file(warn=True))

    def _read_file(self, warn: bool = False) -> dict[str, dict]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
        except (OSError, ValueError, TypeError) as e:
            if warn:
                log.warning("ignoring the kernel-choice cache %s (%s); measuring again", self.path, e)
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict) and "choice" in v}

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = self._read_file() | self.memory  # keep what another process added meanwhile
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
            os.replace(tmp, self.path)  # atomic: a concurrent reader sees the old file or the new one
        except OSError as e:  # a read-only home: the choices still hold for this process
            log.warning("cannot write the kernel-choice cache %s (%s)", self.path, e)


choices = KernelChoices(_default_path())  # the process-wide cache every model asks


# ---- fp32 linear layers without autograd (models/llm.py `linear`: LLM decoding, prefill, scoring)

MIN_WEIGHT = 2**18  # elements (1 MiB in fp32): below it every kernel takes microseconds and none is chosen
DECODE_ROWS = 8  # up to this many input rows a product reads its weights more than it computes: timed as such


def _transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(W @ x^T)^T: the same products as x @ W^T in the other orientation of the BLAS call."""
    y = (weight @ x.t()).t().contiguous()
    return y if bias is None else y.add_(bias)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's fp32 inner product (the op torch's CPU compiler emits), in place of MKL's sgemm."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _has_onednn() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._linear_pointwise is not None
    except (AttributeError, RuntimeError):
        return False


LINEAR_KERNELS: dict[str, Callable] = {"F.linear": torch.nn.functional.linear, "W x^T": _transposed, "oneDNN": _onednn}


def rows_class(rows: int) -> int:
    """The input-row count a linear layer's kernel is measured at: exact for decode steps (1-8 rows),
    32 for 9-64 rows, 256 above (products that large all run at the kernel's arithmetic peak)."""
    return rows if rows <= DECODE_ROWS else 32 if rows <= 64 else 256


def linear_kernel(rows: int, weight: torch.Tensor) -> Callable:
    """The fastest measured kernel for an fp32 (rows, in) x (out, in)^T product on this machine; the
    shape is (rows_class(rows), in, out), the default F.linear (what transformers runs)."""
    shape = (rows_class(rows), weight.shape[1], weight.shape[0])
    name = choices.choose("linear fp32", shape, lambda: _linear_candidates(shape[0], weight), "F.linear")
    return LINEAR_KERNELS[name]


def _linear_candidates(rows: int, weight: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Calls of each kernel on inputs shaped like the real ones. A decode-size product is timed over
    copies of the weight that exceed the caches (in a model every weight comes from memory once per
    token); a larger one over the first 4096 weight rows (a compute-bound product runs at one rate
    whatever its height). A kernel whose result differs from F.linear's beyond rounding is left out."""
    names = ["F.linear", "W x^T"] + (["oneDNN"] if _has_onednn() else [])
    if rows > DECODE_ROWS:
        names.remove("W x^T")
        weights = [weight[:4096]]
    else:
        n = min(64, -(-2 * last_level_cache_bytes() // (weight.numel() * weight.element_size())))
        weights = [weight] + [weight.clone() for _ in range(n - 1)]
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, weights[0])
        calls = {}
        for name in names:
            kernel = LINEAR_KERNELS[name]
            try:
                ok = torch.allclose(kernel(x, weights[0], None), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
            except RuntimeError as e:  # e.g. a oneDNN build without this op's kernel
                log.info("linear kernel %s unavailable: %s", name, e)
                ok = False
            if ok:
                calls[name] = lambda kernel=kernel: [kernel(x, w, None) for w in weights]
    return {name: no_grad(call) for name, call in calls.items()}


def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` run under torch.no_grad (a timed inference kernel must not record autograd history)."""
    def call():
        with torch.no_grad():
            return fn()
    return call


# ---- bf16 autocast for training (training/run_folder.py resolves trainer.precision=auto with it)

AUTOCAST_ROWS = 256  # tokens of the timed block: a batch of 8-32 query sets (enough to show the GEMM rate)


def cpu_autocast_choice(width: int, intermediate: int, rows: int = AUTOCAST_ROWS) -> tuple[str, dict[str, float]]:
    """"bf16-mixed" when a training step of a transformer feed-forward block of this size (LayerNorm,
    width -> intermediate -> width with GELU, forward and backward) runs faster under CPU bf16
    autocast than in fp32 by the choices' margin, else "32-true"; with the medians in ms.

    A block stands for a step because a step's time is its GEMMs plus per-op overheads, and both
    scale the same way here: bf16 GEMMs gain where the CPU has bf16 instructions, and the casts
    autocast inserts cost a fixed amount per op, which small widths do not earn back."""
    shape = (rows, width, intermediate)
    choice = choices.choose("cpu autocast bf16", shape, lambda: _autocast_candidates(*shape), "32-true")
    return choice, choices.memory[choices.key("cpu autocast bf16", shape)].get("ms", {})


def _autocast_candidates(rows: int, width: int, intermediate: int) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    block = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, intermediate), torch.nn.GELU(),
                                torch.nn.Linear(intermediate, width))
    x = torch.randn(rows, width, generator=g)

    def step(dtype: torch.dtype | None):
        def call():
            block.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                y = block(x)
            y.float().square().mean().backward()
        return call

    return {"32-true": step(None), "bf16-mixed": step(torch.bfloat16)}


# ---- attention on the CPU (models/attention.py backend "auto")

def _bucket(n: int) -> int:
    """The power of two at or above n: shapes are measured and cached per bucket, not per length."""
    return 1 << max(0, n - 1).bit_length()


def cpu_attention_backend(q: torch.Tensor, k: torch.Tensor, *, masked: bool, causal: bool, dropout_p: float,
                          grad: bool, attend: Callable) -> str:
    """"sdpa" or "math" for a CPU attention call shaped like (q, k). fp32 runs sdpa: it was the faster
    or level with math at every shape on every CPU measured (a measured choice there only picked up
    noise). In bf16 / fp16 torch's CPU sdpa is several times slower than the explicit softmax(QK^T)V
    on an AVX512-BF16 CPU, backward above all (benchmarks/bench_attention.py), and may not be on
    others: there the faster one is measured, per dtype, mask, causality, pass (forward, or
    forward+backward when `grad`) and shape bucket, at the first call's shape. `attend` is
    models/attention.py's `attention`, handed in so that this module imports no model code."""
    if q.dtype == torch.float32 or q.dtype == torch.float64:
        return "sdpa"
    B, H, Tq, hd = q.shape
    shape = (str(q.dtype).removeprefix("torch."), "fwd+bwd" if grad else "fwd", "mask" if masked else "-",
             "causal" if causal else "-", "dropout" if dropout_p else "-", _bucket(B * H), _bucket(Tq),
             _bucket(k.shape[2]), hd)
    return choices.choose("attention cpu", shape, lambda: _attention_candidates(
        shape, (B, H, Tq, k.shape[2]), dropout_p, attend), "sdpa")


def _attention_candidates(shape: tuple, sizes: tuple[int, int, int, int],
                          dropout_p: float, attention: Callable) -> dict[str, Callable[[], object]]:
    dtype, grad, masked, causal, *_, hd = shape
    B, H, tq, tk = sizes
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, t, hd, generator=g).to(getattr(torch, dtype)).requires_grad_(grad == "fwd+bwd")
               for t in (tq, tk, tk))
    mask = None
    if masked == "mask":
        mask = torch.ones(B, 1, tq, tk, dtype=torch.bool)
        mask[..., tk // 2:] = torch.rand(B, 1, tq, tk - tk // 2, generator=g) < 0.5  # some keys hidden, never all

    def call(backend: str):
        def run():
            with torch.set_grad_enabled(grad == "fwd+bwd"):
                y = attention(q, k, v, mask=mask, causal=causal == "causal", dropout_p=dropout_p, backend=backend)
                if grad == "fwd+bwd":
                    y.float().sum().backward()
                    q.grad = k.grad = v.grad = None
        return run

    return {"sdpa": call("sdpa"), "math": call("math")}
