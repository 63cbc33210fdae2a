"""Initialising one stage from another stage's (trimmed) checkpoint.

Stage checkpoints hold only what that stage trained (models/lit_blip2.py). The next stage takes the
parts it shares, by prefix: stage 2 takes `ln_vision` and the query side of the Q-Former from stage 1
(its text parts and the ITC/ITM heads stay behind, as in BLIP-2); stage 3 takes the whole Q-Former
from stage 1 and then what stage 2 trained on top. A shape mismatch raises; checkpoint keys this
model has no place for are the other stage's own parts and are listed in the log, never loaded
somewhere else; a model key under the prefixes that no given checkpoint provides raises, naming it
and the checkpoints that were to provide it, and so does a checkpoint that provides nothing.

`init_from_checkpoints` takes the prefixes from the caller (the embedded default knows which stage
wrote each file); `init_from_stage_checkpoints` reads them off each checkpoint's own "stage" entry
(`SHARED_BY_STAGE`), plus the image encoder when that stage trained it, for `train.py mode=stage`
where the user names the files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from models.convert import CheckpointError

log = logging.getLogger(__name__)

# What a stage's checkpoint hands on to a later stage: the parts every stage shares, as far as the
# writing stage trained them (models/lit_blip2.py TRAINABLE). Stage 1 has no LLM, so no llm_proj: a
# stage-2/3 model initialised from it keeps a fresh projection, which is how BLIP-2's second stage
# starts. Keyed by the writing stage rather than by what the file happens to contain, so a stage-2
# checkpoint that lost its llm_proj fails instead of silently leaving the projection random.
SHARED_BY_STAGE: dict[str, tuple[str, ...]] = {
    "pretrain": ("ln_vision.", "qformer."),
    "caption": ("ln_vision.", "qformer.", "llm_proj."),
    "instruct": ("ln_vision.", "qformer.", "llm_proj."),
}


def read_lightning_checkpoint(path: str | Path) -> dict:
    """The whole checkpoint dict (state_dict, "stage", ...); a truncated or foreign file names the path."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 -- torch.load raises many types on a truncated or foreign file
        raise CheckpointError(f"cannot read stage checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ck, dict) or "state_dict" not in ck:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ck


def checkpoint_tensors(ck: dict) -> dict[str, torch.Tensor]:
    """Its state_dict, keys without Lightning's "model." prefix."""
    return {k.removeprefix("model."): v for k, v in ck["state_dict"].items()}


def init_from_checkpoints(model: nn.Module, sources: Iterable[tuple[str | Path, Iterable[str]]]) -> list[str]:
    """For each (checkpoint, prefixes) in order, copy its tensors under the prefixes into the model.

    Later sources overwrite earlier ones. Returns the keys that were set.
    """
    return _init(model, ((path, tuple(prefixes)) for path, prefixes in sources))


def init_from_stage_checkpoints(model: nn.Module, paths: Iterable[str | Path]) -> list[str]:
    """`init_from_checkpoints` with each checkpoint's prefixes taken from the stage that wrote it
    (its "stage" entry, written by pipeline.run_stage; `SHARED_BY_STAGE`)."""
    return _init(model, ((path, None) for path in paths))


def _init(model: nn.Module, sources: Iterable[tuple[str | Path, tuple[str, ...] | None]]) -> list[str]:
    ours = model.state_dict()
    loaded: set[str] = set()
    wanted: dict[str, list[str]] = {}  # model key -> the checkpoints that were to provide it
    with torch.no_grad():
        for path, prefixes in sources:
            ck = read_lightning_checkpoint(path)
            tensors = checkpoint_tensors(ck)
            if prefixes is None:
                stage = ck.get("stage")
                if stage not in SHARED_BY_STAGE:
                    raise CheckpointError(f"{path}: 'stage' entry is {stage!r}, not one of {sorted(SHARED_BY_STAGE)}"
                                          " (init_checkpoints takes the final.ckpt a stage run writes)")
                prefixes = SHARED_BY_STAGE[stage]
                # a stage that fine-tuned the encoder (Exp-BLIP step 2: vision.freeze=false) saved it, as
                # checkpoints hold exactly what trained: hand it on too, or the next stage starts from
                # the original weights
                if any(k.startswith("vision.") for k in tensors):
                    prefixes += ("vision.",)
            for key in ours:
                if key.startswith(prefixes):
                    wanted.setdefault(key, []).append(str(path))
            foreign, used = [], 0
            for key, t in tensors.items():
                if not key.startswith(prefixes):
                    continue
                if key not in ours:
                    foreign.append(key)
                    continue
                if tuple(t.shape) != tuple(ours[key].shape):
                    raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, the model wants "
                                          f"{tuple(ours[key].shape)}")
                ours[key].copy_(t)
                loaded.add(key)
                used += 1
            if foreign:
                log.info("%s: %d key(s) of the other stage not used here (e.g. %s)", path, len(foreign),
                         foreign[:3])
            if not used:  # even when a later source would fill the gaps, a file giving nothing is a mistake
                raise CheckpointError(f"{path}: no tensor under {list(prefixes)} that this model has")
            del ck, tensors  # before the next one loads: one checkpoint in memory at a time
    missing = sorted(set(wanted) - loaded)
    if missing:
        files = sorted({f for key in missing for f in wanted[key]})
        raise CheckpointError(f"model key(s) {missing[:8]} ({len(missing)} in all) are in none of the "
                              f"checkpoints that were to provide them: {files}")
    return sorted(loaded)
