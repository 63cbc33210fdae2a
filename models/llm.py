"""A hand-written LLaMA-family decoder: the frozen LLM of BLIP-2 / InstructBLIP.

Pre-norm decoder blocks with RMSNorm, rotate-half rotary position embeddings (RoPE, optionally
linearly or "llama3"-scaled), grouped-query attention and a SwiGLU feed-forward. Submodules carry
the names of Hugging Face `LlamaForCausalLM` state dicts (`model.layers.{i}.self_attn.q_proj`, ...)
so the converter in `models/convert/llama.py` is an identity map that can be read at a glance.

Mistral, Qwen2 / Qwen2.5 and Qwen3 are this same decoder with a few switches, each a documented
`LLMConfig` field: biases on q/k/v (`qkv_bias`, Qwen2) and on o_proj (`o_bias`), an RMSNorm over
each head's width on q and k before RoPE (`qk_norm`, Qwen3), a head width apart from dim / n_heads
(`head_dim`, Qwen3), and a sliding attention window (`sliding_window`, `max_window_layers`: Mistral
v0.1, and Qwen when its config.json opts in). The sliding window is implemented exactly as
transformers masks it (`masking_utils.sliding_window_overlay`): the query in cache slot q sees the
key in slot k iff q - window < k <= q, slots counted over the whole cache, left padding included.
The KV cache still keeps every slot (the mask hides the old ones): exact, not memory-saving.
`HF_FAMILIES` maps each Hugging Face `model_type` to the switches its config.json implies.

The visual soft prompt of BLIP-2 (LAVIS `blip2_opt.py`, `blip2_vicuna_instruct.py`) enters through
`inputs_embeds`: the 32 projected Q-Former query vectors are prepended to the token embeddings and
get ordinary causal attention and positions. The LLM is frozen, but gradients flow through it to
those embeddings.

Every linear layer runs through `linear` below: F.linear, except for fp32 inference on the CPU,
where it runs the kernel measured fastest for the shape on this machine (models/kernel_choice.py;
benchmarks/bench_llm.py times prefill and decoding against transformers).

Checked against: transformers 5.23 `models/llama/modeling_llama.py` and `modeling_rope_utils.py`
(logit parity in tests/models/test_llm.py for MHA/GQA, tied/untied, linear and llama3 RoPE scaling, left
padding); transformers 5.25 `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM` (logits,
inputs_embeds, KV cache, greedy and beam generation with windows shorter than the sequence, in
tests/models/test_llm_families.py). RoPE lives in `models/rope.py`, the KV cache in
`models/kv_cache.py`, generation in `models/generation.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from expvl.models.attention import attention, build_bias
from expvl.models.kernel_choice import MIN_WEIGHT, linear_kernel
from expvl.models.kv_cache import KVCache
from expvl.models.losses import lm_loss, predicted_positions
from expvl.models.rope import RopeScaling, apply_rope, rope_cos_sin, rope_inv_freq


@dataclass
class LLMConfig:
    vocab_size: int = 32000  # rows of embed_tokens and lm_head (InstructBLIP-Vicuna: 32001, "[PAD]" added)
    dim: int = 4096  # residual width (HF hidden_size)
    n_layers: int = 32  # decoder blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads
    hidden_dim: int = 11008  # SwiGLU intermediate width (HF intermediate_size)
    norm_eps: float = 1e-5  # RMSNorm epsilon (LLaMA-2: 1e-5; LLaMA-1 / Vicuna v1.1: 1e-6)
    rope_theta: float = 10000.0  # RoPE base (LLaMA-3: 500000)
    rope_scaling: RopeScaling | None = None  # None = plain RoPE
    max_seq_len: int = 4096  # longest sequence the model is meant for (informational; RoPE is computed)
    tie_embeddings: bool = False  # lm_head shares embed_tokens' weight (then lm_head is absent; small Qwen models)
    qkv_bias: bool = False  # q/k/v projections have biases (Qwen2; HF LLaMA's / Qwen3's attention_bias sets this...)
    o_bias: bool = False  # ...and this: o_proj has a bias (Qwen2 has none on o_proj)
    qk_norm: bool = False  # RMSNorm over each head's width on q and k, before RoPE (Qwen3's q_norm / k_norm)
    head_dim: int | None = None  # per-head width; None = dim // n_heads (LLaMA never differs; Qwen3 does)
    sliding_window: int | None = None  # a query sees only the keys of the last this many cache slots, its
    #   own included (Mistral v0.1: 4096); None = full causal attention
    max_window_layers: int = 0  # blocks numbered below this attend fully even with a sliding_window (Qwen's
    #   max_window_layers); 0 = every block uses the window (Mistral)
    attn_backend: str = "auto"  # models.attention backend: auto | xformers | sdpa | math
    gradient_checkpointing: bool = False  # recompute each block in backward (saves activation memory)

    def __post_init__(self):
        # Derived values are plain attributes, not fields: the None above stays None, so a YAML
        # override of `dim` or `n_heads` on an OmegaConf copy of this config re-derives them instead
        # of carrying a stale head width into the model.
        self.kv_heads: int = self.n_kv_heads or self.n_heads
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        self.head_size: int = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in ("linear", "llama3"):
            raise ValueError(f"unsupported rope_scaling type {self.rope_scaling.rope_type!r}; "
                             "use 'linear' or 'llama3'")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of positions or None, got {self.sliding_window}")

    def uses_window(self, layer: int) -> bool:
        """Whether block `layer` attends through the sliding window (else: full causal attention)."""
        return self.sliding_window is not None and layer >= self.max_window_layers

    @classmethod
    def from_name(cls, name: str, **overrides) -> LLMConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown LLM preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf_json(cls, hf: dict) -> LLMConfig:
        """Read an HF config.json of a family in `HF_FAMILIES` (its `model_type`; absent = "llama"), old
        `rope_theta`/`rope_scaling` or new `rope_parameters`; anything this decoder does not implement
        raises ValueError naming it."""
        model_type = hf.get("model_type", "llama")
        if model_type not in HF_FAMILIES:
            raise ValueError(f"config.json has model_type {model_type!r}; this decoder reads "
                             f"{', '.join(sorted(HF_FAMILIES))}")
        family = HF_FAMILIES[model_type]
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json has hidden_act {hf['hidden_act']!r}; SwiGLU needs 'silu'")
        if hf.get("mlp_bias", False):
            raise ValueError("config.json has mlp_bias=true, which this LLaMA does not implement")
        rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5
        old = hf.get("rope_scaling") or {}  # transformers 4: {"type" or "rope_type": ..., "factor": ...}
        rope = {**old, **rope}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type != "default":
            if rope_type not in ("linear", "llama3"):
                raise ValueError(f"config.json asks for rope type {rope_type!r}; only linear and llama3 "
                                 "scaling are implemented")
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            scaling = RopeScaling(rope_type=rope_type, **{k: rope[k] for k in keys if k in rope})
        bias = bool(hf.get("attention_bias", False))
        window, full_layers = family.window_of(hf)
        # explicit values equal to the derived default are stored as None (the canonical form)
        n_kv = hf.get("num_key_value_heads") or hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        return cls(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                   n_heads=hf["num_attention_heads"],
                   n_kv_heads=None if n_kv == hf["num_attention_heads"] else n_kv,
                   hidden_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                   rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                   rope_scaling=scaling, max_seq_len=hf.get("max_position_embeddings", 2048),
                   tie_embeddings=hf.get("tie_word_embeddings", False),
                   qkv_bias=bias if family.qkv_bias is None else family.qkv_bias,
                   o_bias=bias if family.o_bias is None else family.o_bias, qk_norm=family.qk_norm,
                   head_dim=None if head_dim == hf["hidden_size"] // hf["num_attention_heads"] else head_dim,
                   sliding_window=window, max_window_layers=full_layers)


@dataclass(frozen=True)
class HFFamily:
    """What a Hugging Face model_type's config.json means for `LLMConfig`'s switches, as its transformers
    class reads it (transformers 5.25 `modeling_{llama,mistral,qwen2,qwen3}.py`)."""
    qkv_bias: bool | None  # q/k/v biases fixed by the architecture; None = config.json's attention_bias
    o_bias: bool | None  # o_proj's bias likewise
    qk_norm: bool  # q_norm / k_norm in every attention block
    sliding: bool  # config.json's sliding_window is honoured at all (LlamaForCausalLM ignores one)
    window_opt_in: bool  # ...only with use_sliding_window=true and only in the blocks layer_types (or
    #   max_window_layers) marks (Qwen2/3); else in every block whenever it is set (Mistral)

    def window_of(self, hf: dict) -> tuple[int | None, int]:
        """(sliding_window, max_window_layers) of a config.json: None, 0 when no block uses a window."""
        # absent from config.json: the 4096 of MistralConfig / Qwen2Config / Qwen3Config
        w = hf.get("sliding_window", 4096) if self.sliding else None
        if w is None or (self.window_opt_in and not hf.get("use_sliding_window", False)):
            return None, 0
        if not self.window_opt_in:
            return int(w), 0  # Mistral: every block; transformers warns about and ignores layer_types
        n = hf["num_hidden_layers"]
        types = hf.get("layer_types")
        if types is None:  # what Qwen2Config / Qwen3Config derive when config.json has no layer_types
            first = min(hf.get("max_window_layers", 28), n)
            types = ["full_attention"] * first + ["sliding_attention"] * (n - first)
        first = types.count("full_attention")
        if len(types) != n or types != ["full_attention"] * first + ["sliding_attention"] * (n - first):
            raise ValueError(f"config.json has layer_types {types}; implemented: {n} entries, full_attention "
                             "blocks then sliding_attention ones")
        return (None, 0) if first == n else (int(w), first)


# model_type -> its switches; the loader of each is models/convert/llama.py (models/convert/hf_llm.py FAMILIES)
HF_FAMILIES: dict[str, HFFamily] = {
    "llama": HFFamily(qkv_bias=None, o_bias=None, qk_norm=False, sliding=False, window_opt_in=False),
    "mistral": HFFamily(qkv_bias=False, o_bias=False, qk_norm=False, sliding=True, window_opt_in=False),
    "qwen2": HFFamily(qkv_bias=True, o_bias=False, qk_norm=False, sliding=True, window_opt_in=True),
    "qwen3": HFFamily(qkv_bias=None, o_bias=None, qk_norm=True, sliding=True, window_opt_in=True),
}


PRESETS: dict[str, dict] = {
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008,
                      norm_eps=1e-5, max_seq_len=4096),
    # Vicuna-7B v1.1 (LLaMA-1 based), the InstructBLIP LLM; InstructBLIP resizes vocab_size to 32001
    "vicuna-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008,
                      norm_eps=1e-6, max_seq_len=2048),
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                      norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
    "llama3.1-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        hidden_dim=14336, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
    # the embedded CPU default, trained on synthesized captions; vocab_size follows its tokenizer
    "tiny": dict(vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176,
                 norm_eps=1e-5, max_seq_len=512, tie_embeddings=True),
}


# ----------------------------------------------------------------------------- the blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, cast back before the weight, exactly like HF LlamaRMSNorm
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias). Without autograd, an fp32 product on the CPU with a weight of at
    least kernel_choice.MIN_WEIGHT elements runs the kernel measured fastest for its shape on this
    machine (models/kernel_choice.py `linear_kernel`: F.linear, (W x^T)^T or oneDNN's inner
    product). The products are the same; which kernel streams a decode step's weights at memory
    speed, or runs a prefill at the arithmetic peak, differs between CPUs (benchmarks/bench_llm.py)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (x.device.type != "cpu" or weight.dtype != torch.float32 or x.dtype != torch.float32 or not rows
            or weight.numel() < MIN_WEIGHT or not weight.is_contiguous()
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))):
        return F.linear(x, weight, bias)
    kernel = linear_kernel(rows, weight)
    if kernel is F.linear:
        return F.linear(x, weight, bias)
    return kernel(x.reshape(rows, -1), weight, bias).view(*x.shape[:-1], weight.shape[0])


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`: a plain nn.Linear through `linear`, any other module (int8: llm_int8.py) as it is."""
    return linear(x, layer.weight, layer.bias) if type(layer) is nn.Linear else layer(x)


class SelfAttention(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.kv_heads, c.head_size
        self.backend = c.attn_backend
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_size, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.dim, c.kv_heads * c.head_size, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.dim, c.kv_heads * c.head_size, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_size, c.dim, bias=c.o_bias)
        if c.qk_norm:  # Qwen3: one weight of head width, shared by all heads
            self.q_norm = RMSNorm(c.head_size, c.norm_eps)
            self.k_norm = RMSNorm(c.head_size, c.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, bias, causal: bool, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = project(self.q_proj, x).view(B, T, self.n_heads, self.head_dim)
        k = project(self.k_proj, x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # over each head's width, before RoPE rotates it
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, Hkv, T, hd)
        v = project(self.v_proj, x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, hd), S = cached + T
        y = attention(q, k, v, mask=bias, causal=causal, backend=self.backend)  # (B, H, T, hd)
        return project(self.o_proj, y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x):
        gate, up = project(self.gate_proj, x), project(self.up_proj, x)
        return project(self.down_proj, F.silu(gate) * up)  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.self_attn = SelfAttention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, bias, causal, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias, causal, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """HF's `LlamaModel`: embeddings, blocks, final norm (the `model.` prefix of checkpoint keys)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)


class LLaMA(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # HF LLaMA's initializer (std 0.02); only matters when training the tiny LLM from scratch
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, D), e.g. to append text after the visual soft prompt."""
        return self.model.embed_tokens(input_ids)

    def prefixed(self, prompt: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs for [soft prompt | text]: embeds (B, P + T, D) and mask (B, P + T), the prompt
        (B, P, D) always attended. The BLIP-2 family's way of showing an image to a frozen LLM."""
        tokens = self.embed(input_ids)
        embeds = torch.cat([prompt.to(tokens.dtype), tokens], dim=1)
        return embeds, torch.cat([attention_mask.new_ones(prompt.shape[:2]), attention_mask], dim=1)

    def prefixed_loss(self, prompt: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor, **norm) -> torch.Tensor:
        """LM loss on `labels` (B, T) (-100 = none) after the soft prompt, with logits computed at the
        target positions only; `norm`: per_sample / tokens of models.losses.lm_loss."""
        embeds, mask = self.prefixed(prompt, input_ids, attention_mask)
        full_labels = torch.cat([labels.new_full(prompt.shape[:2], -100), labels], dim=1)
        logits = self(inputs_embeds=embeds, attention_mask=mask, logits_at=predicted_positions(full_labels))["logits"]
        return lm_loss(logits, full_labels, **norm)

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype: that of the token embeddings (never quantized, see models/llm_int8.py)."""
        return self.model.embed_tokens.weight.dtype

    def forward(self, *, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, use_cache: bool = False,
                last_logits_only: bool = False, logits_at: torch.Tensor | None = None) -> dict:
        """Causal LM forward.

        Args:
            input_ids: (B, T) token ids, or
            inputs_embeds: (B, T, D) input vectors (soft prompt + embedded text); exactly one of the two.
            attention_mask: (B, cached + T), 1 = real token, 0 = padding (left or right).
            position_ids: (B, T); default: from the cumulative sum of `attention_mask`, so that the first
                real token of a left-padded row is position 0, as in HF generation.
            cache: a KVCache holding the previous positions (extended in place); with `use_cache` and
                no cache, a new one is created.
            last_logits_only: compute logits for the last position only (generation prefill).
            logits_at: bool (B, T): compute logits only where True, returned flat (N, V) in row-major
                order. A training loss reads only the positions that predict a target
                (models.losses.predicted_positions); the vocabulary projection of every other
                position is skipped (at Vicuna size, B x T x 32000 fp32 logits).
        Returns:
            dict(logits=(B, T or 1, V) or (N, V) fp32-or-model dtype, hidden_states=(B, T, D) after the
                 final norm, cache=KVCache or None).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if logits_at is not None and last_logits_only:
            raise ValueError("pass at most one of last_logits_only and logits_at")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
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
                pos = attention_mask.long().cumsum(-1) - 1
                position_ids = pos.masked_fill(attention_mask == 0, 1)[:, past:]  # pads: any valid value

        # one additive bias for all full-attention blocks and one for the windowed ones (the same while
        # the window covers the whole cache)
        full = _mask_bias(attention_mask, T, past, None, x.dtype, x.device)
        window = self.config.sliding_window
        windowed = full if window is None or past + T <= window else _mask_bias(
            attention_mask, T, past, window, x.dtype, x.device)

        cos, sin = rope_cos_sin(rope_inv_freq(self.config, x.device), position_ids, x.dtype)
        recompute = self.config.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            bias, causal = windowed if self.config.uses_window(i) else full
            if recompute:
                x = checkpoint(layer, x, cos, sin, bias, causal, None, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, bias, causal, cache, i)
        if cache is not None:
            cache.advance(T)
        x = self.model.norm(x)
        h = x
        if last_logits_only:
            h = x[:, -1:]
        elif logits_at is not None:
            h = x[logits_at.bool()]  # (N, D)
        # the lm_head module when untied (it may be an int8 linear, models/llm_int8.py), else the embeddings
        head = self.model.embed_tokens.weight
        logits = project(self.lm_head, h) if self.lm_head is not None else linear(h, head)
        return dict(logits=logits, hidden_states=x, cache=cache)


def _mask_bias(attention_mask: torch.Tensor | None, T: int, past: int, window: int | None, dtype, device
               ) -> tuple[torch.Tensor | None, bool]:
    """(additive bias (B or 1, 1, T, past + T) or None, causal flag) for `T` queries after `past` cached
    slots. No padding and no window: no bias, the kernel applies causality itself. A window keeps the
    keys in slots q - window < k <= q of the query in slot q, counted from the cache's first slot as
    transformers does (`masking_utils.sliding_window_overlay`), padding slots included."""
    S = past + T
    if window is None:
        if attention_mask is None or bool(attention_mask.all()):
            return None, True
        keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        return build_bias(keys, causal=True, tq=T, tk=S, dtype=dtype, device=device), False
    q = torch.arange(past, S, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    keep = ((k <= q) & (k > q - window))[None, None]  # (1, 1, T, S): causal and within the window
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, :]
    return build_bias(keep, causal=False, tq=T, tk=S, dtype=dtype, device=device), False


def resize_vocab(llm: LLaMA, vocab_size: int) -> LLaMA:
    """Append rows to the embeddings (and head) as InstructBLIP does for Vicuna's [PAD] (32000 -> 32001).

    New rows are the mean of the existing ones; [PAD] is never attended to nor predicted. Only the
    (vocab, dim) matrices are replaced, in place, in their dtype and device: rebuilding the model
    would cost a second 7B LLaMA in host memory. A tied head is the embedding matrix
    (models/llm.py: `lm_head` is None) and stays tied.
    """
    old = llm.config.vocab_size
    if vocab_size == old:
        return llm
    if vocab_size < old:
        raise ValueError(f"tokenizer vocab ({vocab_size}) is smaller than the LLM's ({old})")
    embed, head = llm.model.embed_tokens, llm.lm_head
    shared = head is not None and head.weight is embed.weight  # a head tied by sharing the Parameter
    embed.weight = _grown(embed.weight, vocab_size)
    embed.num_embeddings = vocab_size
    if head is not None:
        head.weight = embed.weight if shared else _grown(head.weight, vocab_size)
        head.out_features = vocab_size
    llm.config = replace(llm.config, vocab_size=vocab_size)
    return llm


def fit_vocab(llm, n_tokens: int):
    """The decoder ready for a tokenizer of `n_tokens` ids: grown (`resize_vocab`) when the tokenizer has
    more, as it is when it has as many or fewer. Fewer is how OPT ships (50265 tokens, 50272 rows, padded
    for speed): every id the tokenizer makes has a row, and the extra rows are never produced by it."""
    return resize_vocab(llm, n_tokens) if n_tokens > llm.config.vocab_size else llm


def _grown(weight: torch.nn.Parameter, rows: int) -> torch.nn.Parameter:
    """(vocab, dim) -> (rows, dim): the old rows, then their mean (taken in fp32) in every new one."""
    with torch.no_grad():
        grown = weight.new_empty((rows, weight.shape[1]))
        grown[:weight.shape[0]].copy_(weight)
        grown[weight.shape[0]:].copy_(weight.float().mean(0, keepdim=True).to(weight.dtype))
    return torch.nn.Parameter(grown, requires_grad=weight.requires_grad)
