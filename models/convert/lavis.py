"""LAVIS BLIP-2 / InstructBLIP checkpoints -> our Q-Former, under LAVIS's parameter names.

Handles `blip2_pretrained.pth` (stage 1: full Q-Former with LM head, vision_proj, text_proj,
itm_head, temp), the stage-2 `blip2_opt*` checkpoints (query-only Q-Former: LAVIS sets the word /
position embeddings, the text FFN and `cls` to None, adds `opt_proj`) and InstructBLIP's
`instruct_blip_vicuna7b_trimmed.pth` (text input kept, `cls` None, `llm_proj`).

Our parameter names are LAVIS's minus the `Qformer.` prefix (models/qformer.py), so the map is
that prefix rename plus `query_tokens`, which LAVIS keeps beside `Qformer`. Everything else in the
checkpoint is sorted into two explicit groups by its top-level module name:
- `COMPOSITION_PARTS`: returned to the caller (models/blip2.py applies them with its own strict
  map), keys unchanged, e.g. "ln_vision.weight", "temp";
- `IGNORED_PARTS`: the frozen ViT and LLM, which load from their own files.
A key in neither group is an error, like a missing or mis-shaped Q-Former key.

Loading a checkpoint that has text parts into a model built without them (a stage-1 checkpoint
into the stage-2 query-only Q-Former, or `cls` into InstructBLIP's head-less one) is what BLIP-2
does with `strict=False`; here those keys are listed exactly, from a full model of the same
config, and skipped. The converse (a stage-2 checkpoint into a model that wants text) is an error.

Checked against salesforce/LAVIS lavis/models/blip2_models/{Qformer.py, blip2.py, blip2_qformer.py,
blip2_opt.py, blip2_vicuna_instruct.py}.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from expvl.models.convert.weights import CheckpointError, load_mapped, read_state_dict
from expvl.models.qformer import QFormer, QFormerConfig

PREFIX = "Qformer."  # LAVIS: Blip2Base.init_Qformer returns `Qformer` (a BertLMHeadModel)

COMPOSITION_PARTS = (
    "ln_vision",    # LayerNorm on the ViT tokens before the Q-Former (trained in stage 1)
    "vision_proj",  # stage 1: Linear(768, 256) for ITC query features
    "text_proj",    # stage 1: Linear(768, 256) for the ITC [CLS] feature
    "itm_head",     # stage 1: Linear(768, 2)
    "temp",         # stage 1: learnable ITC temperature (scalar)
    "opt_proj",     # BLIP-2 OPT stage 2: Linear(768, d_llm)
    "llm_proj",     # InstructBLIP: Linear(768, d_llm)
)
IGNORED_PARTS = (
    "visual_encoder",  # the EVA ViT: loaded by models/vision.py from its own weights
    "opt_model",       # the frozen OPT of blip2_opt
    "llm_model",       # the frozen LLaMA / Vicuna of InstructBLIP
)
# a persistent buffer of LAVIS's BertEmbeddings (arange(512)); we compute positions instead
POSITION_IDS = PREFIX + "bert.embeddings.position_ids"


# the LM decoder's bias is `cls.predictions.bias` under a second name (BERT ties them); read the
# canonical name so a checkpoint saved without the alias loads too
DECODER_BIAS = "cls.predictions.decoder.bias"


def lavis_key_map(model: QFormer) -> dict[str, str]:
    """{our key: LAVIS key} for every entry of `model.state_dict()`."""
    key_map = {k: (k if k == "query_tokens" else PREFIX + k) for k in model.state_dict()}
    if DECODER_BIAS in key_map:
        key_map[DECODER_BIAS] = PREFIX + "cls.predictions.bias"
    return key_map


def _check_tied(source: Mapping[str, torch.Tensor], what: str) -> None:
    """Our decoder shares the word-embedding matrix; refuse a checkpoint where they differ."""
    emb, dec = (source.get(PREFIX + k) for k in ("bert.embeddings.word_embeddings.weight",
                                                   "cls.predictions.decoder.weight"))
    if emb is None or dec is None or emb.is_meta or dec.is_meta or emb.shape != dec.shape:
        return  # absent or mis-shaped keys are reported by load_mapped
    if not torch.equal(emb, dec):
        raise CheckpointError(f"{what}: {PREFIX}cls.predictions.decoder.weight differs from the word "
                              f"embeddings, but the Q-Former ties them")


def _unused_text_keys(cfg: QFormerConfig, ours: Mapping[str, str]) -> list[str]:
    """LAVIS keys of the text parts a full model of this config has and `ours` lacks."""
    with torch.device("meta"):
        full = QFormer(replace(cfg, text_input=True, lm_head=True))
    return sorted(set(lavis_key_map(full).values()) - set(ours.values()))


def load_lavis_qformer(model: QFormer, checkpoint: str | Path | Mapping[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """Load the Q-Former part of a LAVIS checkpoint (path or state dict) into `model`, strictly.

    Returns the composition parts found in the checkpoint ({"ln_vision.weight": ..., "temp": ...}).
    Raises CheckpointError naming the file and key on anything missing, unexpected or mis-shaped.
    """
    what = f"LAVIS checkpoint {checkpoint}" if isinstance(checkpoint, (str, Path)) else "LAVIS state dict"
    source = read_state_dict(checkpoint) if isinstance(checkpoint, (str, Path)) else dict(checkpoint)
    key_map = lavis_key_map(model)
    top = {k: k.split(".", 1)[0] for k in source}
    parts = {k: v for k, v in source.items() if top[k] in COMPOSITION_PARTS}
    ignore = [k for k in source if top[k] in IGNORED_PARTS] + list(parts)
    ignore += [POSITION_IDS, PREFIX + DECODER_BIAS]
    ignore += _unused_text_keys(model.cfg, key_map)
    if model.cfg.text_input and PREFIX + "bert.embeddings.word_embeddings.weight" not in source:
        raise CheckpointError(f"{what}: has no Q-Former text embeddings (a stage-2 query-only checkpoint?);"
                              f" build the Q-Former with text_input=False to load it")
    if model.cfg.lm_head:
        _check_tied(source, what)
    load_mapped(model, source, key_map, ignore=ignore, what=what)
    return parts
