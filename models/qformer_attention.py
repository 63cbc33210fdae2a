"""The Q-Former's attention blocks (LAVIS `BertSelfAttention` / `BertSelfOutput` / `BertAttention`).

`Attention` is the self-attention over `[queries | text]` and the base of `CrossAttention`, the
queries' attention to the image tokens, which can compute the same function two ways ("project",
BLIP-2 as written, or "absorb", the K/V weights moved to the query side; its docstring gives the
algebra and the FLOP count). `AddNorm` is BERT's post-LN residual block, also used by the FFNs in
models/qformer.py, which assembles these into layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from einops import rearrange
from torch import nn

from models.absorbed_attention import AbsorbedCrossAttention
from models.attention import attention, build_bias

if TYPE_CHECKING:  # models/qformer.py imports this module; the config is only read here
    from models.qformer import QFormerConfig


class KV(NamedTuple):
    k: torch.Tensor  # (B, H, S, hd)
    v: torch.Tensor  # (B, H, S, hd)


class QKV(nn.Module):
    """LAVIS `BertSelfAttention`: the projections; keys/values may come from the image."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)


class AddNorm(nn.Module):
    """LAVIS `BertSelfOutput` / `BertOutput`: dense -> dropout -> LayerNorm(x + residual)."""

    def __init__(self, cfg: QFormerConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    """LAVIS `BertAttention`: multi-head attention (`self`) + post-LN residual block (`output`)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.cfg = cfg
        self.self = QKV(cfg, kv_width)  # the name LAVIS checkpoints use
        self.output = AddNorm(cfg, cfg.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b t (h d) -> b h t d", h=self.cfg.num_heads)

    def project_kv(self, source: torch.Tensor) -> KV:
        """(B, S, kv_width) -> keys and values (B, H, S, hd)."""
        return KV(self._heads(self.self.key(source)), self._heads(self.self.value(source)))

    def forward(self, x: torch.Tensor, kv: KV, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, D) attends to kv (B, H, S, hd) under mask (B, 1|H, T, S) bool or None."""
        q = self._heads(self.self.query(x))  # (B, H, T, hd)
        drop = self.cfg.attention_dropout if self.training else 0.0
        y = attention(q, kv.k, kv.v, mask=mask, dropout_p=drop, backend=self.cfg.attention_backend)
        return self.output(rearrange(y, "b h t d -> b t (h d)"), x)


class CrossAttention(Attention):
    """Queries attend to the image; two ways to compute the same function (`cross_attention_impl`).

    "project" is BLIP-2 as written: K = X Wk^T + bk and V = X Wv^T + bv for all N image tokens X
    (B, N, E), then attention. That costs ~2 N E D multiply-adds per image for the projections
    alone, and in BLIP-2 (N = 257 tokens of E = 1408, D = 768) they are most of the Q-Former.

    "absorb" moves Wk and Wv to the query side instead (associativity; the "weight absorption"
    of multi-head latent attention). Per head h with hd-dim slices Wk_h, Wv_h (hd, E):
        scores_h = q_h K_h^T = (q_h Wk_h) X^T + q_h bk_h        (q_h Wk_h: T x E)
        out_h    = P_h V_h   = (P_h X) Wv_h^T + rowsum(P_h) bv_h   (P_h X: T x E)
    (rowsum(P_h) = 1 without dropout; the bias term is kept so dropout stays exact; q_h bk_h is
    one constant per score row, which softmax ignores). This costs ~2 T E D + 2 H T N E: cheaper
    when H T is small next to D and N, which holds for BLIP-2's 32 queries (0.63x the FLOPs) but
    not for a small Q-Former over few image tokens. "auto" absorbs when that count is under 3/4 of
    the projection's (the margin covers the per-head products with inner size hd, which run slower
    per FLOP: the embedded default, 8 queries over 16 tokens of width 256, is at 0.97 and projects).
    The absorbed path runs as one autograd Function with a hand-written backward,
    models/absorbed_attention.py, which keeps every (., E) tensor in one layout (no copies).
    Rounding differs at the 1e-6 level; tests/test_qformer.py checks both against transformers.
    benchmarks/bench_qformer.py: BLIP-2 size fwd+bwd, absorb vs project.
    """

    def use_absorb(self, num_queries: int, num_tokens: int) -> bool:
        impl = self.cfg.cross_attention_impl
        if impl != "auto":
            return impl == "absorb"
        D, H, E = self.cfg.hidden_size, self.cfg.num_heads, self.cfg.encoder_width
        T, N = num_queries, num_tokens
        return T * D * E + H * T * N * E < 0.75 * (N * E * D + T * N * D)

    def forward(self, x: torch.Tensor, image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, D) queries attend to image (B, N, E) under mask (B, 1, 1, N) bool or None."""
        if not self.use_absorb(x.shape[1], image.shape[1]):
            return super().forward(x, self.project_kv(image), mask)
        qkv = self.self
        bias = None
        if mask is not None:  # additive, as in models.attention (a fully masked row -> uniform)
            bias = build_bias(mask, causal=False, tq=x.shape[1], tk=image.shape[1], dtype=torch.float32,
                              device=x.device)
        drop = self.cfg.attention_dropout if self.training else 0.0
        y = AbsorbedCrossAttention.apply(qkv.query(x), image, qkv.key.weight, qkv.key.bias,
                                         qkv.value.weight, qkv.value.bias, bias, self.cfg.num_heads,
                                         self.cfg.head_dim ** -0.5, drop)
        return self.output(y, x)
