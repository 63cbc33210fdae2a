"""Hugging Face LLaMA-family folders (config.json + safetensors or pytorch_model*.bin) -> `models.llm.LLaMA`.

Our submodules carry HF `LlamaForCausalLM` names and use the same rotate-half RoPE layout, so the
map is the identity on names with no permutation of q/k weights (unlike Meta's original
checkpoints, which need one). It is still written out key by key from the config, so that a
checkpoint with a missing, extra or mis-shaped tensor fails naming it.

Checked against: transformers 5.23 `LlamaForCausalLM.save_pretrained` output (tests/test_convert_llama.py)
and the key set of a meta-device LLaMA-2-7B.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.convert import CheckpointError, load_mapped, read_state_dict
from models.llm import LLaMA, LLMConfig


def hf_llama_key_map(config: LLMConfig) -> dict[str, str]:
    """{our_key: hf_key} for every tensor of `LLaMA(config)`."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_embeddings:
        names.append("lm_head.weight")
    for i in range(config.n_layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"{p}.self_attn.{proj}.weight")
            if config.attention_bias:
                names.append(f"{p}.self_attn.{proj}.bias")
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


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of an HF folder: a sharded index, else a single file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({type(e).__name__}: {e})") from None
            shards = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [str(s) for s in shards if not s.exists()]
            if missing:
                raise CheckpointError(f"{index} lists shard(s) that do not exist: {missing}")
            return shards
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return [folder / single]
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json, "
                          "pytorch_model.bin or pytorch_model.bin.index.json")


def read_hf_config(folder: str | Path) -> LLMConfig:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} not found: a Hugging Face LLaMA folder needs its config.json")
    try:
        return LLMConfig.from_hf_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {type(e).__name__}: {e}") from None


def load_hf_llama(folder: str | Path, *, dtype: torch.dtype | None = None, attn_backend: str = "auto",
                  gradient_checkpointing: bool = False) -> LLaMA:
    """Build a LLaMA from a Hugging Face folder; `dtype` (e.g. torch.float16) casts every weight.

    The model is built on the meta device and the checkpoint tensors are assigned into it, so a 7B
    model costs its weights' memory once, not twice.
    """
    folder = Path(folder)
    config = read_hf_config(folder)
    config.attn_backend = attn_backend
    config.gradient_checkpointing = gradient_checkpointing
    source: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        part = read_state_dict(f)
        clash = sorted(set(part) & set(source))
        if clash:
            raise CheckpointError(f"{f}: key(s) {clash[:4]} also appear in another shard")
        source.update(part)
    with torch.device("meta"):
        model = LLaMA(config)
    key_map = hf_llama_key_map(config)
    cast = {k: (lambda t: t.to(dtype)) for k in key_map} if dtype is not None else {}
    load_mapped(model, source, key_map, ignore=hf_llama_ignored_keys(config), transforms=cast,
                what=f"HF LLaMA checkpoint {folder}")
    return model
