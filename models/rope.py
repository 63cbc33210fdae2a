"""Rotary position embeddings (RoPE) of the LLaMA family, in the rotate-half layout of Hugging Face
checkpoints, with the two context-stretching schemes LLaMA checkpoints declare: "linear" (positions
divided by a factor) and "llama3" (long wavelengths interpolated, short ones kept, a smooth ramp
between). Used by models/llm.py.

Checked against: transformers 5.23 `models/llama/modeling_llama.py` (`rotate_half`,
`apply_rotary_pos_emb`) and `modeling_rope_utils.py` (`_compute_llama3_parameters`); logit parity
for both scalings in tests/models/test_llm.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class RopeScaling:
    """Stretching RoPE to longer contexts than the model was trained on."""
    rope_type: str = "linear"  # "linear" (positions / factor) or "llama3" (frequency-band dependent)
    factor: float = 1.0  # how many times longer the context becomes
    low_freq_factor: float = 1.0  # llama3 only: wavelengths above orig_len / this are fully scaled
    high_freq_factor: float = 4.0  # llama3 only: wavelengths below orig_len / this are untouched
    original_max_position_embeddings: int = 8192  # llama3 only: the context length of pre-training


class RopeSpec(Protocol):
    """What RoPE reads from a decoder's config (models/llm.py `LLMConfig` has these fields)."""
    head_size: int
    rope_theta: float
    rope_scaling: RopeScaling | None


def rope_inv_freq(config: RopeSpec, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in fp32 for `config` (its head_size, rope_theta and
    rope_scaling), with linear or llama3 scaling applied."""
    hd = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    # llama3: long wavelengths are interpolated by `factor`, short ones kept, a smooth ramp between
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, T, head_dim), computed in fp32 and cast like HF."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: the two halves share frequencies
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos/sin (B, T, hd)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin
