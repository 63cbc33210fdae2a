"""Scaled dot-product attention: the one function every module in `models/` calls.

Backends (chosen per call by `backend`, default "auto"):
- "xformers": `xformers.ops.memory_efficient_attention` (CUDA tensors only, optional extra `gpu`)
- "sdpa":     `torch.nn.functional.scaled_dot_product_attention` (flash / mem-efficient / math
              kernels chosen by PyTorch)
- "math":     an explicit softmax(QK^T * scale + bias) V, the readable reference used by tests
"auto" picks xformers when it is installed and the tensors are on CUDA, else sdpa; on the CPU in bf16
or fp16 it then runs sdpa or math, whichever measured faster for the call's pass and shape on this
machine (models/kernel_choice.py `cpu_attention_backend`, cached): with AVX512-BF16, torch's CPU sdpa
is several times slower than math in bf16. If xformers was asked for but cannot run, we fall back to
sdpa and log the reason once.

Masks. `mask` is either boolean (True = may attend) or additive float, broadcastable to
(B, H, Tq, Tk). `causal=True` adds a causal mask aligned to the bottom right, so that with a KV
cache (Tq < Tk) query i sees keys up to Tk - Tq + i. A boolean mask is turned into an additive one
with the dtype's most negative finite value rather than -inf: a row whose keys are all masked
(left padding in batched generation) then attends uniformly instead of producing NaN, and every
backend computes the same numbers.

Grouped-query attention: k and v may have fewer heads than q (H % Hkv == 0); they are repeated.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F

from expvl.models.kernel_choice import cpu_attention_backend

Backend = Literal["auto", "xformers", "sdpa", "math"]
log = logging.getLogger(__name__)

try:  # optional: only the `gpu` extra installs it, and it has no CPU kernels
    import xformers.ops as xops
except Exception as e:  # ImportError, or a broken CUDA build raising at import
    xops = None
    _XFORMERS_MISSING = f"xformers is not importable ({type(e).__name__}: {e})"
else:
    _XFORMERS_MISSING = ""

_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """The backend a call with these arguments will really use."""
    if backend not in ("auto", "xformers", "sdpa", "math"):
        raise ValueError(f"unknown attention backend {backend!r}; use auto, xformers, sdpa or math")
    if backend in ("auto", "xformers"):
        reason = _XFORMERS_MISSING or ("" if device.type == "cuda" else
                                       f"xformers has no kernels for {device.type} tensors")
        if not reason:
            return "xformers"
        if backend == "xformers":
            _warn_once(f"attention backend 'xformers' unavailable, using 'sdpa': {reason}")
        return "sdpa"
    return backend


def build_bias(mask: torch.Tensor | None, *, causal: bool, tq: int, tk: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor | None:
    """Combine a boolean/additive mask and the causal constraint into one additive bias."""
    neg = torch.finfo(dtype).min
    bias = None
    if mask is not None:
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, neg)
        else:
            bias = mask.to(dtype)
    if causal:
        # bottom-right alignment: key j is visible to query i iff j <= i + (tk - tq)
        keep = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)
        c = torch.zeros(tq, tk, dtype=dtype, device=device).masked_fill(~keep, neg)
        # clamp so adding two large negatives stays finite
        bias = c if bias is None else (bias + c).clamp(min=neg)
    return bias


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
              causal: bool = False, dropout_p: float = 0.0, scale: float | None = None,
              backend: Backend = "auto") -> torch.Tensor:
    """Multi-head attention. q: (B, H, Tq, hd); k, v: (B, Hkv, Tk, hd). Returns (B, H, Tq, hd)."""
    B, H, Tq, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    which = resolve_backend(backend, q.device)
    if backend == "auto" and q.device.type == "cpu":
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        which = cpu_attention_backend(q, k, masked=mask is not None, causal=causal, dropout_p=dropout_p, grad=grad,
                                      attend=attention)
    if causal and Tq == 1:
        causal = False  # bottom-right aligned, one query (a decode step) sees every key: no mask to build

    if which == "sdpa" and mask is None:
        # no explicit bias: let SDPA use its fused causal kernels (top-left aligned, so only
        # when there is no cache offset)
        if not causal or Tq == Tk:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                                  scale=scale)
    bias = build_bias(mask, causal=causal, tq=Tq, tk=Tk, dtype=q.dtype, device=q.device)

    if which == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    if which == "xformers":
        return _xformers(q, k, v, bias, dropout_p, scale)
    return _math(q, k, v, bias, dropout_p, scale)


def _math(q, k, v, bias, dropout_p, scale):
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if bias is not None:
        scores = scores + bias
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def _xformers(q, k, v, bias, dropout_p, scale):  # pragma: no cover - needs CUDA
    B, H, Tq, hd = q.shape
    Tk = k.shape[2]
    if bias is not None:
        # xformers wants a dense (B, H, Tq, Tk) bias whose last dim is stored with a stride that
        # is a multiple of 8: allocate padded, then slice.
        pad = (Tk + 7) // 8 * 8
        full = torch.zeros(B, H, Tq, pad, dtype=q.dtype, device=q.device)
        full[..., :Tk] = bias.expand(B, H, Tq, Tk)
        bias = full[..., :Tk]
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, T, H, hd)
        attn_bias=bias, p=dropout_p, scale=scale)
    return out.transpose(1, 2)
