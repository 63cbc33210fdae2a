"""Hugging Face LLaMA-family folders (config.json + safetensors or pytorch_model*.bin) -> `models.llm.LLaMA`.

The family is the config.json's `model_type`: llama, mistral, qwen2 (Qwen2 / Qwen2.5) or qwen3, each
read into `LLMConfig`'s switches by `models.llm.HF_FAMILIES`. Our submodules carry HF
`LlamaForCausalLM` names, which the other three share (plus Qwen3's `self_attn.q_norm` /
`self_attn.k_norm`), and use the same rotate-half RoPE layout, so the map is the identity on names
with no permutation of q/k weights (unlike Meta's original checkpoints, which need one). It is
still written out key by key from the config (biases only where the family has them, the q/k
norms only for Qwen3), so that a checkpoint with a missing, extra or mis-shaped tensor fails naming
it.

Checked against: transformers 5.23 `LlamaForCausalLM.save_pretrained` output
(tests/models/test_convert_llama.py), the key set of a meta-device LLaMA-2-7B, and transformers 5.25
`MistralForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` folders (tests/models/test_llm_families.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from expvl.models.convert.weights import CheckpointError, load_mapped, read_weights
from expvl.models.llm import LLaMA, LLMConfig


def hf_llama_key_map(config: LLMConfig) -> dict[str, str]:
    """{our_key: hf_key} for every tensor of `LLaMA(config)`."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_embeddings:
        names.append("lm_head.weight")
    for i in range(config.n_layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"{p}.self_attn.{proj}.weight")
            if config.o_bias if proj == "o_proj" else config.qkv_bias:
                names.append(f"{p}.self_attn.{proj}.bias")
        if config.qk_norm:
            names += [f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.append(f"{p}.mlp.{proj}.weight")
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
    return {name: name for name in names}


def hf_llama_ignored_keys(config: LLMConfig) -> list[str]:
    """Checkpoint keys we deliberately drop."""
    # old checkpoints saved the RoPE frequencies as a buffer; we compute them from the config
    ignored = [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(config.n_layers)]
    if config.tie_embeddings:
        ignored.append("lm_head.weight")  # some tied checkpoints still store the duplicate
    return ignored


# transformers' vision-language models that hold a decoder as `language_model` (config.json `text_config`)
COMPOSITES = ("instructblip", "blip-2")
COMPOSITE_PREFIX = "language_model."


def read_hf_config(folder: str | Path) -> tuple[LLMConfig, str]:
    """The LLaMA config of a folder and the prefix of its decoder's keys: "" for a decoder's own folder,
    "language_model." for a transformers InstructBlip / Blip2 folder whose `text_config` is one of
    `models.llm.HF_FAMILIES`."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} not found: a Hugging Face LLaMA-family folder needs its config.json")
    try:
        hf = json.loads(path.read_text())
        prefix = ""
        if hf.get("model_type") in COMPOSITES:
            hf, prefix = hf["text_config"], COMPOSITE_PREFIX
        return LLMConfig.from_hf_json(hf), prefix
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {type(e).__name__}: {e}") from None


def load_hf_llama(folder: str | Path, *, dtype: torch.dtype | None = None, attn_backend: str = "auto",
                  gradient_checkpointing: bool = False) -> LLaMA:
    """Build a LLaMA from a Hugging Face LLaMA, Mistral, Qwen2 / Qwen2.5 or Qwen3 folder; `dtype` (e.g.
    torch.float16) casts every weight.

    The folder is the decoder's own, or a transformers InstructBlip / Blip2 one (e.g. InstructBLIP-Vicuna),
    whose `language_model.*` alone is read, its other parts (vision_model, qformer, ...) left to their
    own loaders. Tensors are cast as they are read and assigned into a model built on the meta device,
    so a 7B model costs its weights' memory once, in `dtype`, not twice.
    """
    folder = Path(folder)
    config, prefix = read_hf_config(folder)
    config.attn_backend = attn_backend
    config.gradient_checkpointing = gradient_checkpointing
    # a composite's other parts (vision_model, qformer, ...) are not read at all
    source = read_weights(folder, keep=(lambda k: k.startswith(prefix)) if prefix else None, dtype=dtype)
    with torch.device("meta"):
        model = LLaMA(config)
    key_map = {ours: prefix + theirs for ours, theirs in hf_llama_key_map(config).items()}
    ignore = [prefix + k for k in hf_llama_ignored_keys(config)]
    load_mapped(model, source, key_map, ignore=ignore, what=f"HF LLaMA checkpoint {folder}")
    return model
