"""A BLIP-2 family checkpoint as a starting point: its Q-Former, and the parts around it in our names.

One entry for the two formats a Q-Former comes in: a LAVIS `.pth` (BLIP-2 stage 1, `blip2_opt*`,
InstructBLIP; lavis.py) and a transformers Blip2 / InstructBlip folder or `.safetensors` file
(hf_blip2.py). The Q-Former loads strictly; what the checkpoint holds around it comes back renamed to
the names models/blip2.py and models/vlfau.py use: `ln_vision.*` (transformers: the vision tower's
`post_layernorm`), `llm_proj.*` (LAVIS BLIP-2 OPT: `opt_proj`; transformers: `language_projection`),
and LAVIS's stage-1 heads (`vision_proj`, `text_proj`, `itm_head`, `temp`) as they are. The caller
copies what its model has a place for (`copy_parts`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from expvl.models.convert.eva import HF_LN_VISION
from expvl.models.convert.hf_blip2 import load_hf_qformer_file
from expvl.models.convert.lavis import load_lavis_qformer
from expvl.models.convert.weights import CheckpointError
from expvl.models.qformer import QFormer

log = logging.getLogger(__name__)

SOURCES = ("lavis", "transformers")
# their names of the parts around the Q-Former -> ours, by prefix
RENAME = {"lavis": {"opt_proj.": "llm_proj."},  # BLIP-2 OPT's name for the same projection
          "transformers": {"language_projection.": "llm_proj.", HF_LN_VISION: "ln_vision."}}


def checkpoint_source(path: str | Path) -> str:
    """"transformers" for a folder or a .safetensors file, "lavis" for anything else (a torch file)."""
    return "transformers" if Path(path).is_dir() or str(path).endswith(".safetensors") else "lavis"


def load_qformer_checkpoint(qformer: QFormer, path: str | Path, source: str | None = None
                            ) -> dict[str, torch.Tensor]:
    """Load the checkpoint's Q-Former (and query tokens) into `qformer`, strictly; return the other parts
    it holds, renamed to ours. `source`: "lavis" | "transformers" | None (told by the path)."""
    source = source or checkpoint_source(path)
    if source not in SOURCES:
        raise ValueError(f"checkpoint source {source!r}: use one of {SOURCES}")
    parts = load_lavis_qformer(qformer, path) if source == "lavis" else load_hf_qformer_file(qformer, path)
    rename = RENAME[source]
    return {next((new + key[len(old):] for old, new in rename.items() if key.startswith(old)), key): t
            for key, t in parts.items()}


def copy_parts(model: nn.Module, parts: dict[str, torch.Tensor], path: str | Path, *,
               required: tuple[str, ...] = ()) -> None:
    """Copy the parts (our names) into `model`'s tensors of the same name, shape-checked. A part the model
    has no place for (a stage-1 head in a stage-2 model) is skipped and logged; a `required` key the
    checkpoint lacks raises, naming the file."""
    absent = [k for k in required if k not in parts]
    if absent:
        raise CheckpointError(f"{path}: no {', '.join(absent)}")
    ours = model.state_dict()
    with torch.no_grad():
        for key, t in parts.items():
            if key not in ours:
                log.info("%s: %s has no place in this %s, not loaded", path, key, type(model).__name__)
                continue
            if tuple(t.shape) != tuple(ours[key].shape):
                raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, the model wants "
                                      f"{tuple(ours[key].shape)}")
            ours[key].copy_(t)
