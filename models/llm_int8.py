"""Int8 linear weights for a frozen LLM's inference on CPU (timed in benchmarks/bench_llm.py).

Greedy decoding at small batch is a chain of matrix-vector products that read every weight once
per token: on a CPU it is bound by memory bandwidth, not arithmetic (the matrix products dominate
a decode step). In fp32, models/llm.py `linear` runs the kernel that streams the weights fastest
on the machine; fewer bytes per weight is what makes decoding faster still. `int8_linears` swaps every
`nn.Linear` of the decoder layers and an untied `lm_head` for PyTorch's dynamically quantized
linear (`torch.ao.quantization.quantize_dynamic`: int8 weights, per-tensor scale; activations
quantized per call). The token embeddings and RMSNorms stay in float.

Two engines pack and run those weights: fbgemm (torch's "x86" default for linear layers; AVX2 /
AVX512-VNNI kernels) and oneDNN (AVX512-VNNI, and AMX-INT8 where the CPU has it). `engine="auto"`
times both on a decode step of the model's largest decoder layer (models/kernel_choice.py, cached
per CPU model and shape) and keeps fbgemm unless oneDNN is clearly faster. A packed weight carries
its engine's kernel with it: the global `torch.backends.quantized.engine` is only set while packing.

Not bit-exact: logits move by the int8 rounding (tests/models/test_llm_int8.py bounds it and checks
greedy tokens on a trained model). For a *frozen* LLM at inference only: quantized linears have
no gradients, so the model is returned in eval mode with requires_grad off. CPU only (the
quantized kernels are CPU kernels); on a GPU use bf16/fp16 weights instead (`pretrained.llm_dtype`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import nn

from expvl.models import kernel_choice
from expvl.models.llm import LLaMA

ENGINES = ("x86", "onednn")  # "x86" packs linear layers with fbgemm ("fbgemm" itself is the same kernel)
DECODE_ROWS = 4  # the decode step an engine is timed on: 4 sequences (the benchmarks' batch)


def int8_linears(llm: LLaMA, engine: str = "auto") -> LLaMA:
    """A copy of `llm` whose linear layers hold int8 weights; the original is not modified.
    `engine`: "auto" (measured, see the module docstring), "x86" or "onednn"."""
    if any(p.device.type != "cpu" for p in llm.parameters()):
        raise ValueError("int8_linears: the quantized kernels run on CPU; move the LLM to CPU first")
    if llm.dtype != torch.float32:
        raise ValueError(f"int8_linears quantizes from fp32 weights, got {llm.dtype}")
    if engine not in ("auto", *ENGINES):
        raise ValueError(f"int8_linears: engine {engine!r}; use auto or one of {ENGINES}")
    if engine == "auto":
        engine = int8_engine(max((m for m in llm.model.layers.modules() if type(m) is nn.Linear),
                                 key=lambda m: m.weight.numel()))
    model = copy.deepcopy(llm).eval().requires_grad_(False)
    return _quantize(model, engine)


def _quantize(model: nn.Module, engine: str) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings(), _packing_engine(engine):  # torch.ao announces its move to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


@contextlib.contextmanager
def _packing_engine(engine: str):
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(f"int8_linears: this torch build has no {engine!r} quantized engine "
                         f"(has {torch.backends.quantized.supported_engines})")
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def int8_engine(layer: nn.Linear) -> str:
    """The quantized engine measured fastest for a decode step through `layer`'s shape on this CPU
    ("x86" unless "onednn" wins by kernel_choice's margin). Timed over copies of the layer that
    exceed the caches, as decoding reads every weight from memory once per token."""
    out_f, in_f = layer.weight.shape
    available = [e for e in ENGINES if e in torch.backends.quantized.supported_engines]
    if len(available) < 2:
        return available[0] if available else "x86"

    def candidates():
        n = min(64, -(-2 * kernel_choice.last_level_cache_bytes() // (layer.weight.numel() * 4)))
        stack = nn.Sequential(*(nn.Linear(in_f, out_f, bias=False) for _ in range(n))).eval().requires_grad_(False)
        x = torch.randn(DECODE_ROWS, in_f)
        packed = {e: _quantize(copy.deepcopy(stack), e) for e in available}
        return {e: kernel_choice.no_grad(lambda m=m: [layer(x) for layer in m]) for e, m in packed.items()}

    return kernel_choice.choices.choose("int8 linear engine", (DECODE_ROWS, in_f, out_f), candidates, "x86")
