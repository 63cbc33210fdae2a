"""Hugging Face OPT folders (config.json + safetensors or pytorch_model*.bin) -> `models.opt.OPT`.

Reads transformers `OPTForCausalLM` folders (facebook/opt-2.7b, opt-6.7b, ...) and the
`language_model.*` of a transformers Blip2 / InstructBlip folder whose `text_config` is OPT
(Salesforce/blip2-opt-2.7b's layout). Our parameter names are transformers' minus `decoder.`
(`model.decoder.layers.0.fc1.weight` -> `model.layers.0.fc1.weight`); the map is written out key by
key from the config, so a checkpoint with a missing, extra or mis-shaped tensor fails naming it.
A state dict saved from the base `OPTModel` has the same keys without the leading `model.`; both
load. The head is tied to the token embeddings: a stored `lm_head.weight` is dropped after checking
that it is that matrix.

`opt_config_from_hf` refuses what models/opt.py does not implement (an activation other than ReLU)
and reads OPT's switches (`do_layer_norm_before`, `_remove_final_layer_norm`, `word_embed_proj_dim`,
`enable_bias`, `layer_norm_elementwise_affine`, `tie_word_embeddings`).

Checked against: transformers 5.25 `OPTForCausalLM.save_pretrained` and `Blip2ForConditionalGeneration`
folders (tests/models/test_opt.py, tests/models/test_blip2_opt.py) and the key set of a meta-device
OPT-6.7B.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from expvl.models.convert.llama import COMPOSITE_PREFIX, COMPOSITES
from expvl.models.convert.weights import CheckpointError, load_mapped, read_weights
from expvl.models.opt import OPT, OPTConfig

BASE_PREFIX = "model."  # OPTForCausalLM's; a bare OPTModel state dict starts at "decoder."


def opt_config_from_hf(hf: Mapping) -> OPTConfig:
    """Our OPTConfig for an HF OPT config.json (as a dict)."""
    if hf.get("model_type", "opt") != "opt":
        raise ValueError(f"config.json has model_type {hf.get('model_type')!r}, expected 'opt'")
    act = hf.get("activation_function", "relu")
    if act != "relu":
        raise ValueError(f"config.json has activation_function {act!r}; only OPT's ReLU is implemented")
    hidden = hf["hidden_size"]
    proj = hf.get("word_embed_proj_dim") or hidden
    return OPTConfig(vocab_size=hf["vocab_size"], hidden_size=hidden, n_layers=hf["num_hidden_layers"],
                     n_heads=hf["num_attention_heads"], ffn_dim=hf["ffn_dim"],
                     max_positions=hf.get("max_position_embeddings", 2048),
                     word_embed_proj_dim=None if proj == hidden else proj,
                     pre_norm=hf.get("do_layer_norm_before", True),
                     final_norm=not hf.get("_remove_final_layer_norm", False),
                     norm_affine=hf.get("layer_norm_elementwise_affine", True),
                     bias=hf.get("enable_bias", True), tie_embeddings=hf.get("tie_word_embeddings", True))


def hf_opt_key_map(config: OPTConfig) -> dict[str, str]:
    """{our_key: HF OPTForCausalLM key} for every tensor of `OPT(config)`."""
    norm = ("weight", "bias") if config.norm_affine else ()
    linear = ("weight", "bias") if config.bias else ("weight",)
    names = ["embed_tokens.weight", "embed_positions.weight"]
    if config.dim != config.hidden_size:
        names += ["project_in.weight", "project_out.weight"]
    if config.has_final_norm:
        names += [f"final_layer_norm.{p}" for p in norm]
    for i in range(config.n_layers):
        p = f"layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            names += [f"{p}.self_attn.{proj}.{w}" for w in linear]
        names += [f"{p}.{fc}.{w}" for fc in ("fc1", "fc2") for w in linear]
        names += [f"{p}.{ln}.{w}" for ln in ("self_attn_layer_norm", "final_layer_norm") for w in norm]
    key_map = {f"model.{n}": f"model.decoder.{n}" for n in names}
    if not config.tie_embeddings:
        key_map["lm_head.weight"] = "lm_head.weight"
    return key_map


def read_hf_opt_config(folder: str | Path) -> tuple[OPTConfig, str]:
    """The OPT config of a folder and the prefix of its OPT's keys: "" for an OPT folder,
    "language_model." for a transformers Blip2 / InstructBlip folder whose `text_config` is an OPT."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} not found: a Hugging Face OPT folder needs its config.json")
    try:
        hf = json.loads(path.read_text())
        prefix = ""
        if hf.get("model_type") in COMPOSITES:
            hf, prefix = hf["text_config"], COMPOSITE_PREFIX
        return opt_config_from_hf(hf), prefix
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {type(e).__name__}: {e}") from None


def _check_tied_head(source: Mapping[str, torch.Tensor], embed_key: str, head_key: str, what: str) -> None:
    emb, head = source.get(embed_key), source.get(head_key)
    if emb is None or head is None or emb.is_meta or head.is_meta or emb.shape != head.shape:
        return  # absent (tied heads are usually not saved) or mis-shaped: load_mapped reports the embeddings
    if not torch.equal(emb, head):
        raise CheckpointError(f"{what}: {head_key} differs from {embed_key}, but the config ties them "
                              "(tie_word_embeddings)")


def load_opt_state(model: OPT, source: Mapping[str, torch.Tensor], *, prefix: str = "", what: str) -> None:
    """Copy an HF OPT state dict (keys under `prefix`, e.g. "language_model.") into `model`, strictly."""
    config = model.config
    base = BASE_PREFIX
    if not any(k.startswith(prefix + BASE_PREFIX) for k in source) and any(
            k.startswith(prefix + "decoder.") for k in source):
        base = ""  # saved from the base OPTModel
    def located(theirs: str) -> str:  # an OPTForCausalLM key where this source holds it
        if theirs.startswith(BASE_PREFIX):
            theirs = base + theirs[len(BASE_PREFIX):]
        return prefix + theirs

    key_map = {ours: located(theirs) for ours, theirs in hf_opt_key_map(config).items()}
    ignore = []
    if config.tie_embeddings:
        head = prefix + "lm_head.weight"
        _check_tied_head(source, key_map["model.embed_tokens.weight"], head, what)
        ignore.append(head)
    load_mapped(model, source, key_map, ignore=ignore, what=what)


def load_hf_opt(folder: str | Path, *, dtype: torch.dtype | None = None, attn_backend: str = "auto",
                gradient_checkpointing: bool = False) -> OPT:
    """Build an OPT from a Hugging Face folder; `dtype` (e.g. torch.float16) casts every weight.

    The folder is an OPT's own, or a transformers Blip2 / InstructBlip one (BLIP-2 OPT), whose
    `language_model.*` alone is read. Tensors are cast as they are read and assigned into a model
    built on the meta device, so a 6.7B model costs its weights' memory once, in `dtype`.
    """
    folder = Path(folder)
    config, prefix = read_hf_opt_config(folder)
    config.attn_backend = attn_backend
    config.gradient_checkpointing = gradient_checkpointing
    source = read_weights(folder, keep=(lambda k: k.startswith(prefix)) if prefix else None, dtype=dtype)
    with torch.device("meta"):
        model = OPT(config)
    load_opt_state(model, source, prefix=prefix, what=f"HF OPT checkpoint {folder}")
    return model
