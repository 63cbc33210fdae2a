"""One entry for a language model in a Hugging Face folder: `load_hf_llm(folder, dtype=...)`.

The folder's config.json names the family (`model_type`; for a transformers Blip2 / InstructBlip
folder, its `text_config.model_type`, and the weights are its `language_model.*`); `FAMILIES` maps each
supported family to the loader of its decoder. Any other family is refused, naming it and the
supported ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from expvl.models.convert.llama import COMPOSITES, load_hf_llama
from expvl.models.convert.opt import load_hf_opt
from expvl.models.convert.weights import CheckpointError

# model_type -> the loader of that family's decoder (folder, dtype=...) -> module
FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "llama": load_hf_llama,
    "mistral": load_hf_llama,  # the LLaMA decoder with a sliding window (models/llm.py HF_FAMILIES)
    "qwen2": load_hf_llama,  # q/k/v biases; Qwen2.5 is model_type qwen2 too
    "qwen3": load_hf_llama,  # q/k norms, head_dim apart from hidden_size / heads
    "opt": load_hf_opt,  # models/opt.py: BLIP-2 OPT's and Exp-BLIP's decoder (its own block, learned positions)
}
SUPPORTED = tuple(sorted(FAMILIES))


def hf_model_type(folder: str | Path) -> str:
    """The language model's family in a Hugging Face folder (a composite's `text_config` counts)."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} not found: a Hugging Face model folder needs its config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if config.get("model_type") in COMPOSITES:
        config = config.get("text_config") or {}
    return str(config.get("model_type"))


def load_hf_llm(folder: str | Path, *, dtype: torch.dtype | None = None, **options) -> nn.Module:
    """The decoder of the folder's family, its weights cast to `dtype` as they are read (None: as stored).
    `options` go to the family's loader (e.g. attn_backend)."""
    family = hf_model_type(folder)
    if family not in FAMILIES:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: model_type {family!r} is not a supported language "
                              f"model family; supported: {', '.join(SUPPORTED)}")
    return FAMILIES[family](folder, dtype=dtype, **options)
