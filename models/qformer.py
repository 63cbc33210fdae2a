"""The BLIP-2 Q-Former, written by hand (BLIP-2 paper §3.1; InstructBLIP paper §2.2).

A BERT-base encoder (post-LN) whose input is `[Q learned queries | T text tokens]`. Queries and
text share the self-attention weights; the mask (models/qformer_masks.py) decides who sees whom.
After self-attention only the first Q positions cross-attend to the image (every
`cross_attention_freq`-th layer) and go through their own FFN (`intermediate_query` /
`output_query`); the text positions go through the BERT FFN (`intermediate` / `output`).
Queries get no position embedding; text positions start at 0; the embedding LayerNorm + dropout
is applied to the queries as well.

The attention blocks: `Attention` is the self-attention over `[queries | text]` and the base of
`CrossAttention`, the queries' attention to the image tokens, which can compute the same function two
ways ("project", BLIP-2 as written, or "absorb", the K/V weights moved to the query side; its
docstring gives the algebra and the FLOP count). `AddNorm` is BERT's post-LN residual block, also
used by the FFNs.

Named phases (each returns a dict):
- `encode_queries`   query-only pass over the image (ITC image side, BLIP-2 stage 2 soft prompt),
                     optionally keeping the per-layer self-attention K/V for ITG;
- `encode_text`      text-only, bidirectional, no cross-attention (ITC text side);
- `encode_multimodal` queries + text, bidirectional (ITM, InstructBLIP instruction-aware queries);
- `decode_text`      ITG / captioning: text decoded causally on top of the cached query K/V,
                     exactly as LAVIS passes `past_key_values` from the query pass;
- `forward`          one pass with any explicit (B, L, L) mask: what the tests compare against.

Parameter names reproduce LAVIS's `Qformer.bert.*` / `Qformer.cls.*` (minus the `Qformer.`
prefix), so models/convert/lavis.py is a visible prefix rename. `text_input=False` builds the
BLIP-2 stage-2 query-only model (no word/position embeddings, no text FFN, no LM head) instead of
building everything and deleting parts as LAVIS does.

Checked against salesforce/LAVIS lavis/models/blip2_models/Qformer.py and transformers 5.23
`Blip2QFormerModel` / `InstructBlipQFormerModel` (numerical parity in tests/models/test_qformer.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from expvl.models.absorbed_attention import AbsorbedCrossAttention
from expvl.models.attention import attention, build_bias
from expvl.models.qformer_masks import bidirectional_mask, multimodal_causal_mask


@dataclass
class QFormerConfig:
    vocab_size: int = 30523  # bert-base-uncased (30522) + the [DEC] token BLIP-2 adds for ITG
    hidden_size: int = 768  # D, width of queries and text tokens
    num_layers: int = 12  # BERT-base depth
    num_heads: int = 12  # head dim 64
    intermediate_size: int = 3072  # FFN width (both the query and the text FFN)
    hidden_act: str = "gelu"  # exact (erf) GELU, as BERT's "gelu"; the only one supported
    hidden_dropout: float = 0.1  # after every dense projection before the residual LayerNorm
    attention_dropout: float = 0.1  # on the attention probabilities
    layer_norm_eps: float = 1e-12  # BERT's value
    max_position_embeddings: int = 512  # longest text the absolute positions cover
    encoder_width: int = 1408  # width of the image tokens the queries cross-attend to (EVA ViT-g)
    cross_attention_freq: int = 2  # layers with layer_index % freq == 0 cross-attend (0, 2, ...)
    num_query_tokens: int = 32  # Q, the learned queries
    pad_token_id: int = 0  # [PAD] of bert-base-uncased; its embedding row gets no gradient
    initializer_range: float = 0.02  # std of the normal init of linears, embeddings and queries
    text_input: bool = True  # False = BLIP-2 stage-2 query-only model: no word/position
    #                          embeddings, no text FFN (and then no LM head)
    lm_head: bool = True  # BERT MLM-style head for ITG (stage 1); InstructBLIP has none
    attention_backend: str = "auto"  # models.attention backend: auto / sdpa / math / xformers
    cross_attention_impl: str = "auto"  # "project" the image to K/V, "absorb" the K/V weights into
    #                                     the queries, or "auto" = absorb when that needs under 3/4
    #                                     of the FLOPs (models/qformer.py CrossAttention)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; BLIP-2 uses 'gelu'")
        if self.cross_attention_impl not in ("auto", "project", "absorb"):
            raise ValueError(f"cross_attention_impl {self.cross_attention_impl!r}: use auto, project or absorb")
        if self.lm_head and not self.text_input:
            raise ValueError("lm_head=True needs text_input=True (the head decodes text tokens)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> QFormerConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown Q-Former preset {name!r}; known: {sorted(PRESETS)}")
        return replace(cls(**PRESETS[name]), **overrides)


PRESETS = {
    "blip2": {},  # the stage-1 BLIP-2 Q-Former (LAVIS blip2_pretrained.pth): the defaults above
    "tiny": {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
             "max_position_embeddings": 64, "encoder_width": 48, "num_query_tokens": 4},
}


@dataclass
class QFormerCache:
    """Per-layer self-attention keys/values of `[Q queries | text so far]`, for ITG decoding."""
    kv: list[KV]
    num_queries: int

    @property
    def text_len(self) -> int:
        return self.kv[0].k.shape[2] - self.num_queries

    def index_select(self, index: torch.Tensor) -> QFormerCache:
        """Reorder / repeat the batch (beam search)."""
        return QFormerCache([KV(k.index_select(0, index), v.index_select(0, index)) for k, v in self.kv],
                            self.num_queries)


# ---- attention blocks (LAVIS `BertSelfAttention` / `BertSelfOutput` / `BertAttention`) -------------------

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
    Rounding differs at the 1e-6 level; tests/models/test_qformer.py checks both against transformers.
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


# ---- layers -------------------------------------------------------------------------------------------

class Intermediate(nn.Module):
    """LAVIS `BertIntermediate`: the first half of the FFN."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    """LAVIS `BertLayer` with `query_length > 0`: shared self-attention, then queries and text split."""

    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = Attention(cfg, kv_width=cfg.hidden_size)
        self.has_cross_attention = index % cfg.cross_attention_freq == 0
        if self.has_cross_attention:
            self.crossattention = CrossAttention(cfg, kv_width=cfg.encoder_width)
        if cfg.text_input:
            self.intermediate = Intermediate(cfg)
            self.output = AddNorm(cfg, cfg.intermediate_size)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = AddNorm(cfg, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, *, num_queries: int, mask: torch.Tensor | None,
                image: torch.Tensor | None, image_mask: torch.Tensor | None, past: KV | None) -> dict:
        """h: (B, Q+T, D) -> {"hidden": (B, Q+T, D), "kv": this layer's self-attention K/V}.

        `past` holds K/V of earlier positions (the cached query pass); h then holds only new text.
        """
        kv = self.attention.project_kv(h)
        if past is not None:
            kv = KV(torch.cat([past.k, kv.k], dim=2), torch.cat([past.v, kv.v], dim=2))
        a = self.attention(h, kv, mask)  # (B, Q+T, D)
        queries, text = a[:, :num_queries], a[:, num_queries:]
        parts = []
        if num_queries:
            if self.has_cross_attention:
                if image is None:
                    raise ValueError("queries need image_embeds: this layer cross-attends to the image")
                queries = self.crossattention(queries, image, image_mask)
            parts.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1]:
            parts.append(self.output(self.intermediate(text), text))
        return {"hidden": parts[0] if len(parts) == 1 else torch.cat(parts, dim=1), "kv": kv}


class Embeddings(nn.Module):
    """LAVIS `BertEmbeddings`: word + absolute position for text, none for queries; LN + dropout."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        if cfg.text_input:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, queries: torch.Tensor | None, input_ids: torch.Tensor | None,
                position_offset: int = 0) -> torch.Tensor:
        """queries (B, Q, D) and/or input_ids (B, T) -> (B, Q+T, D); text positions start at offset."""
        parts = [] if queries is None else [queries]
        if input_ids is not None:
            T = input_ids.shape[1]
            pos = torch.arange(position_offset, position_offset + T, device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(pos)[None])
        return self.dropout(self.LayerNorm(torch.cat(parts, dim=1)))


class LMHead(nn.Module):
    """LAVIS `BertLMPredictionHead` (`cls.predictions`): transform, then a decoder with a tied bias."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.transform = nn.Module()  # namespace for the checkpoint names transform.{dense,LayerNorm}
        self.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias  # one tensor under both names, as in BERT

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.transform.LayerNorm(F.gelu(self.transform.dense(h)))
        return self.decoder(h)


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        # (1, Q, D); in LAVIS it lives beside `Qformer`, the converters map it by name
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))
        self.bert = nn.Module()  # namespaces reproducing LAVIS's Qformer.bert.* key names
        self.bert.embeddings = Embeddings(cfg)
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_layers))
        if cfg.lm_head:
            self.cls = nn.Module()
            self.cls.predictions = LMHead(cfg)
            # BERT ties the decoder to the word embeddings (HF tie_weights in LAVIS's BertLMHeadModel)
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT init: normal(0, initializer_range) weights, zero biases, unit LayerNorms."""
        std = self.cfg.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.query_tokens, std=std)
        if self.cfg.text_input:  # after the loop: the tied LM decoder re-drew this matrix
            with torch.no_grad():
                self.bert.embeddings.word_embeddings.weight[self.cfg.pad_token_id].zero_()

    @property
    def layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    def _need_text(self, phase: str) -> None:
        if not self.cfg.text_input:
            raise ValueError(f"{phase} needs text, but this Q-Former was built with text_input=False")

    def _queries(self, B: int, query_embeds: torch.Tensor | None) -> torch.Tensor:
        return self.query_tokens.expand(B, -1, -1) if query_embeds is None else query_embeds

    def _encode(self, h: torch.Tensor, *, num_queries: int, mask: torch.Tensor | None,
                image_embeds: torch.Tensor | None, image_mask: torch.Tensor | None,
                past: QFormerCache | None = None) -> dict:
        """Run the layers on embedded h (B, L, D); mask (B, L, S) bool "may attend" or None = all."""
        self_mask = None if mask is None else mask[:, None]  # (B, 1, L, S): same for every head
        cross_mask = None if image_mask is None else image_mask.bool()[:, None, None, :]  # (B, 1, 1, N)
        image = None if image_embeds is None else image_embeds.to(h.dtype)
        kvs = []
        for i, layer in enumerate(self.layers):
            out = layer(h, num_queries=num_queries, mask=self_mask, image=image, image_mask=cross_mask,
                        past=None if past is None else past.kv[i])
            h = out["hidden"]
            kvs.append(out["kv"])
        n_q = num_queries if past is None else past.num_queries
        return {"hidden": h, "cache": QFormerCache(kvs, n_q)}

    # ---- named phases ---------------------------------------------------------------------------

    def encode_queries(self, image_embeds: torch.Tensor, image_mask: torch.Tensor | None = None, *,
                       query_embeds: torch.Tensor | None = None, use_cache: bool = False) -> dict:
        """Query-only pass. image_embeds (B, N, encoder_width), image_mask (B, N) or None = all seen.

        Returns {"hidden": (B, Q, D), "cache": QFormerCache | None}; the cache holds the per-layer
        self-attention K/V of the queries, reused by `decode_text` (ITG).
        """
        queries = self._queries(image_embeds.shape[0], query_embeds)
        h = self.bert.embeddings(queries, None)
        out = self._encode(h, num_queries=queries.shape[1], mask=None, image_embeds=image_embeds,
                           image_mask=image_mask)
        return {"hidden": out["hidden"], "cache": out["cache"] if use_cache else None}

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Text-only pass, bidirectional, no cross-attention. Returns {"hidden": (B, T, D)}."""
        self._need_text("encode_text")
        h = self.bert.embeddings(None, input_ids)
        out = self._encode(h, num_queries=0, mask=bidirectional_mask(0, attention_mask),
                           image_embeds=None, image_mask=None)
        return {"hidden": out["hidden"]}

    def encode_multimodal(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          image_embeds: torch.Tensor, image_mask: torch.Tensor | None = None, *,
                          query_embeds: torch.Tensor | None = None) -> dict:
        """Queries + text, bidirectional mask (ITM; InstructBLIP instruction-aware queries).

        attention_mask (B, T) covers the text only. Returns {"query_hidden": (B, Q, D),
        "text_hidden": (B, T, D)}.
        """
        self._need_text("encode_multimodal")
        out = self.forward(mask=bidirectional_mask(self._num_queries(query_embeds), attention_mask),
                           input_ids=input_ids, image_embeds=image_embeds, image_mask=image_mask,
                           query_embeds=query_embeds)
        return {"query_hidden": out["query_hidden"], "text_hidden": out["text_hidden"]}

    def decode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    cache: QFormerCache) -> dict:
        """ITG: text rows attend to the cached queries and causally to text (multimodal causal mask).

        input_ids (B, T) are the new tokens; attention_mask (B, T_past + T) covers all text so far
        (T_past = text already in the cache, 0 after `encode_queries(use_cache=True)`).
        Returns {"logits": (B, T, V), "hidden": (B, T, D), "cache": cache extended by these tokens}.
        """
        self._need_text("decode_text")
        Q, T_past, T = cache.num_queries, cache.text_len, input_ids.shape[1]
        if attention_mask.shape[1] != T_past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} text tokens, expected "
                             f"{T_past} cached + {T} new")
        mask = multimodal_causal_mask(Q, attention_mask)[:, Q + T_past:]  # (B, T, Q + T_past + T)
        h = self.bert.embeddings(None, input_ids, position_offset=T_past)
        out = self._encode(h, num_queries=0, mask=mask, image_embeds=None, image_mask=None, past=cache)
        return {"logits": self.lm_logits(out["hidden"]), "hidden": out["hidden"], "cache": out["cache"]}

    def lm_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, vocab_size) through the LM head."""
        if not self.cfg.lm_head:
            raise ValueError("this Q-Former was built with lm_head=False")
        return self.cls.predictions(text_hidden)

    def _num_queries(self, query_embeds: torch.Tensor | None) -> int:
        return self.cfg.num_query_tokens if query_embeds is None else query_embeds.shape[1]

    def forward(self, *, mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                query_embeds: torch.Tensor | None = None) -> dict:
        """One pass over `[queries | text]` with an explicit (B, L, L) mask from models.qformer_masks.

        Queries are present iff image_embeds is given. Returns {"hidden": (B, L, D),
        "query_hidden": (B, Q, D), "text_hidden": (B, T, D)}.
        """
        queries = None
        if image_embeds is not None:
            queries = self._queries(image_embeds.shape[0], query_embeds)
        if input_ids is not None:
            self._need_text("a pass with input_ids")
        Q = 0 if queries is None else queries.shape[1]
        h = self.bert.embeddings(queries, input_ids)
        if mask.shape[1:] != (h.shape[1], h.shape[1]):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, the sequence is {Q} queries + "
                             f"{h.shape[1] - Q} text tokens")
        out = self._encode(h, num_queries=Q, mask=mask, image_embeds=image_embeds, image_mask=image_mask)
        h = out["hidden"]
        return {"hidden": h, "query_hidden": h[:, :Q], "text_hidden": h[:, Q:]}
