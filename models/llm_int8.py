"""Int8 linear weights for a frozen LLM's inference on CPU (timed in benchmarks/bench_llm.py).

Greedy decoding at small batch is a chain of matrix-vector products that read every weight once
per token: on a CPU it is bound by memory bandwidth, not arithmetic (the matrix products dominate
a decode step). In fp32, models/llm.py `linear` already streams the weights at close to memory
speed; fewer bytes per weight is what makes decoding faster still. `int8_linears` swaps every
`nn.Linear` of the decoder layers and an untied `lm_head` for PyTorch's dynamically quantized
linear (`torch.ao.quantization.quantize_dynamic`: int8 weights, per-tensor scale; activations
quantized per call; fbgemm / x86 kernels). The token embeddings and RMSNorms stay in float.

Not bit-exact: logits move by the int8 rounding (tests/models/test_llm_int8.py bounds it and checks
greedy tokens on a trained model). For a *frozen* LLM at inference only: quantized linears have
no gradients, so the model is returned in eval mode with requires_grad off. CPU only (the
quantized kernels are CPU kernels); on a GPU use bf16/fp16 weights instead (`pretrained.llm_dtype`).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from expvl.models.llm import LLaMA


def int8_linears(llm: LLaMA) -> LLaMA:
    """A copy of `llm` whose linear layers hold int8 weights; the original is not modified."""
    if any(p.device.type != "cpu" for p in llm.parameters()):
        raise ValueError("int8_linears: the quantized kernels run on CPU; move the LLM to CPU first")
    if llm.dtype != torch.float32:
        raise ValueError(f"int8_linears quantizes from fp32 weights, got {llm.dtype}")
    from torch.ao.quantization import quantize_dynamic

    model = copy.deepcopy(llm).eval().requires_grad_(False)
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
