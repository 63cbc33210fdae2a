"""A hand-written OPT decoder: the frozen LLM of BLIP-2 OPT and of Exp-BLIP (OPT-2.7B / OPT-6.7B).

Meta's OPT (Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models") as transformers
implements it: learned absolute position embeddings read at `position + 2` (OPT's offset; the table
has `max_positions + 2` rows), positions counted from the attention mask so that the first real
token of a left-padded row is position 0, multi-head attention and a ReLU feed-forward with biases,
LayerNorm before each block (`pre_norm`, every OPT except 350m) or after it (350m's post-LN layout,
which also has no final norm), a final LayerNorm, optional `project_in` / `project_out` between a
narrower token-embedding width (`word_embed_proj_dim`, 350m: 512) and the residual width, and an
output head tied to the token embeddings.

The decoder interface is models/llm.py `LLaMA`'s, so that models/blip2.py, models/vlfau.py and
models/generation.py drive either one: `embed(ids)`, `prefixed(prompt, ids, mask)`,
`prefixed_loss(...)`, `forward(input_ids=|inputs_embeds=, attention_mask, cache, logits_at, ...)`,
`config.vocab_size`, `config.n_layers`, `config.dim` (the width of input vectors: what a soft prompt
must have) and `dtype`. Submodules carry transformers' `OPTForCausalLM` names minus `decoder.`
(`model.layers.{i}.self_attn.q_proj`, `model.embed_positions`, ...) with the token embeddings at
`model.embed_tokens` and the head at `lm_head` (None when tied), the layout models/llm.py
`resize_vocab` grows. The converter is models/convert/opt.py.

Not implemented, as nothing here needs it: dropout and LayerDrop (the decoder is frozen and runs in
eval mode in every stage; training/lit_base.py) and activations other than ReLU (every OPT checkpoint
uses ReLU; others are refused when a config is read).

Checked against: transformers 5.25 `models/opt/modeling_opt.py` (tests/models/test_opt.py: logits of
pre-LN and post-LN models with project_in/out, left padding, cached decoding, greedy and beam
generation token-identical, the loss after a soft prompt; tests/models/test_blip2_opt.py: inside a
transformers `Blip2ForConditionalGeneration` with an OPT language model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from expvl.models.attention import attention, build_bias
from expvl.models.kv_cache import KVCache
from expvl.models.llm import linear, project
from expvl.models.losses import lm_loss, predicted_positions

POSITION_OFFSET = 2  # OPT reads its position table at position + 2 (fairseq kept two rows for padding)


@dataclass
class OPTConfig:
    vocab_size: int = 50272  # rows of embed_tokens and the head (OPT: its 50265 tokens padded to 8k rows)
    hidden_size: int = 4096  # residual width (OPT-6.7B: 4096, OPT-2.7B: 2560)
    n_layers: int = 32  # decoder blocks (HF num_hidden_layers)
    n_heads: int = 32  # attention heads (HF num_attention_heads); head width hidden_size // n_heads
    ffn_dim: int = 16384  # ReLU feed-forward width (OPT-6.7B: 16384, OPT-2.7B: 10240)
    max_positions: int = 2048  # learned positions (HF max_position_embeddings); the table holds 2 more rows
    word_embed_proj_dim: int | None = None  # token-embedding width; None = hidden_size; another value adds
    #   project_in / project_out (bias-free linears) between it and the residual width (OPT-350m: 512)
    pre_norm: bool = True  # HF do_layer_norm_before: LayerNorm before attention / FFN (every OPT but 350m);
    #   False = after the residual sums (350m), and then there is no final LayerNorm
    final_norm: bool = True  # the final LayerNorm of a pre-norm model (HF: not _remove_final_layer_norm)
    norm_affine: bool = True  # LayerNorms have a weight and bias (HF layer_norm_elementwise_affine)
    norm_eps: float = 1e-5  # LayerNorm epsilon (HF OPT uses nn.LayerNorm's default)
    bias: bool = True  # attention and FFN linears have biases (HF enable_bias)
    tie_embeddings: bool = True  # the head is the token embedding matrix (every OPT checkpoint)
    attn_backend: str = "auto"  # models.attention backend: auto | xformers | sdpa | math
    gradient_checkpointing: bool = False  # recompute each block in backward (saves activation memory)

    def __post_init__(self):
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")

    @property
    def dim(self) -> int:
        """The width of the decoder's input vectors: token embeddings, and so a soft prompt (BLIP-2's
        projection maps the Q-Former to this)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def has_final_norm(self) -> bool:
        return self.pre_norm and self.final_norm


PRESETS: dict[str, dict] = {
    # facebook/opt-2.7b and opt-6.7b config.json: BLIP-2 OPT's and Exp-BLIP's frozen LLMs
    "opt-2.7b": dict(hidden_size=2560, n_layers=32, n_heads=32, ffn_dim=10240),
    "opt-6.7b": dict(hidden_size=4096, n_layers=32, n_heads=32, ffn_dim=16384),
}


def opt_preset(name: str, **overrides) -> OPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown OPT preset {name!r}; known: {sorted(PRESETS)}")
    return OPTConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- the blocks

def _layer_norm(c: OPTConfig) -> nn.LayerNorm:
    return nn.LayerNorm(c.hidden_size, eps=c.norm_eps, elementwise_affine=c.norm_affine)


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.backend = c.n_heads, c.head_size, c.attn_backend
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=c.bias)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=c.bias)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=c.bias)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=c.bias)

    def forward(self, x, bias, causal: bool, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        heads = lambda t: t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731  (B, H, T, hd)
        q = heads(project(self.q_proj, x))
        k, v = heads(project(self.k_proj, x)), heads(project(self.v_proj, x))
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S, hd), S = cached + T
        y = attention(q, k, v, mask=bias, causal=causal, backend=self.backend)  # (B, H, T, hd)
        return project(self.out_proj, y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        c = config
        self.pre_norm = c.pre_norm
        self.self_attn = OPTAttention(c)
        self.self_attn_layer_norm = _layer_norm(c)
        self.fc1 = nn.Linear(c.hidden_size, c.ffn_dim, bias=c.bias)
        self.fc2 = nn.Linear(c.ffn_dim, c.hidden_size, bias=c.bias)
        self.final_layer_norm = _layer_norm(c)

    def forward(self, x, bias, causal, cache, layer):
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h, bias, causal, cache, layer)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + project(self.fc2, F.relu(project(self.fc1, h)))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTBody(nn.Module):
    """HF's `OPTDecoder` (the `model.decoder.` prefix of checkpoint keys; `model.` here)."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.embed_positions = nn.Embedding(c.max_positions + POSITION_OFFSET, c.hidden_size)
        narrow = c.dim != c.hidden_size
        self.project_in = nn.Linear(c.dim, c.hidden_size, bias=False) if narrow else None
        self.project_out = nn.Linear(c.hidden_size, c.dim, bias=False) if narrow else None
        self.final_layer_norm = _layer_norm(c) if c.has_final_norm else None
        self.layers = nn.ModuleList(OPTDecoderLayer(c) for _ in range(c.n_layers))


class OPT(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.model = OPTBody(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # HF OPT's initializer (init_std 0.02); only matters for a decoder trained from scratch
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, dim), e.g. to append text after the visual soft prompt."""
        return self.model.embed_tokens(input_ids)

    def prefixed(self, prompt: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs for [soft prompt | text]: embeds (B, P + T, dim) and mask (B, P + T), the prompt
        (B, P, dim) always attended (as models/llm.py LLaMA.prefixed)."""
        tokens = self.embed(input_ids)
        embeds = torch.cat([prompt.to(tokens.dtype), tokens], dim=1)
        return embeds, torch.cat([attention_mask.new_ones(prompt.shape[:2]), attention_mask], dim=1)

    def prefixed_loss(self, prompt: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor, **norm) -> torch.Tensor:
        """LM loss on `labels` (B, T) (-100 = none) after the soft prompt, logits computed at the target
        positions only; `norm`: per_sample / tokens of models.losses.lm_loss."""
        embeds, mask = self.prefixed(prompt, input_ids, attention_mask)
        full_labels = torch.cat([labels.new_full(prompt.shape[:2], -100), labels], dim=1)
        at = predicted_positions(full_labels)
        logits = self(inputs_embeds=embeds, attention_mask=mask, logits_at=at)["logits"]
        return lm_loss(logits, full_labels, **norm)

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype: that of the token embeddings (never quantized, see models/llm_int8.py)."""
        return self.model.embed_tokens.weight.dtype

    def forward(self, *, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, use_cache: bool = False,
                last_logits_only: bool = False, logits_at: torch.Tensor | None = None) -> dict:
        """Causal LM forward; the arguments and the returned dict are models/llm.py LLaMA.forward's.

        Positions (B, T), when not given, come from the whole `attention_mask` (B, cached + T) as in
        transformers: cumsum(mask) * mask - 1, the new T columns, so a left-padded row's first real
        token is position 0, the soft prompt before the padding keeps 0..P-1, and a decode step after a
        cached prefix continues from the prefix's real tokens. Padding reads row -1 + 2 = 1, as in HF.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if logits_at is not None and last_logits_only:
            raise ValueError("pass at most one of last_logits_only and logits_at")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, dim)
        B, T, _ = x.shape
        if cache is None and use_cache:
            cache = KVCache(self.config.n_layers)
        past = cache.length if cache is not None else 0
        if logits_at is not None and logits_at.shape != (B, T):
            raise ValueError(f"logits_at has shape {tuple(logits_at.shape)}, expected {(B, T)}")
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"{(B, past + T)} (cached {past} + new {T} positions)")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
            else:
                m = attention_mask.long()
                position_ids = (m.cumsum(-1) * m - 1)[:, past:]
        if int(position_ids.max()) >= self.config.max_positions:
            raise ValueError(f"position {int(position_ids.max())} is beyond OPT's "
                             f"{self.config.max_positions} learned positions")
        body = self.model
        h = project(body.project_in, x) if body.project_in is not None else x
        x = h + body.embed_positions(position_ids + POSITION_OFFSET).to(h.dtype)  # (B, T, hidden)

        # one additive bias for all layers; with no padding, let the kernel apply causality itself
        if attention_mask is None or bool(attention_mask.all()):
            bias, causal = None, True
        else:
            keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
            bias = build_bias(keys, causal=True, tq=T, tk=past + T, dtype=x.dtype, device=x.device)
            causal = False  # (B, 1, T, S) already holds the causal part

        recompute = self.config.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(body.layers):
            if recompute:
                x = checkpoint(layer, x, bias, causal, None, i, use_reentrant=False)
            else:
                x = layer(x, bias, causal, cache, i)
        if cache is not None:
            cache.advance(T)
        if body.final_layer_norm is not None:
            x = body.final_layer_norm(x)
        if body.project_out is not None:
            x = project(body.project_out, x)  # (B, T, dim)
        h = x
        if last_logits_only:
            h = x[:, -1:]
        elif logits_at is not None:
            h = x[logits_at.bool()]  # (N, dim)
        logits = project(self.lm_head, h) if self.lm_head is not None else linear(h, body.embed_tokens.weight)
        return dict(logits=logits, hidden_states=x, cache=cache)
