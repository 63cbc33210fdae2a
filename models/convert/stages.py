"""Initialising one stage from another stage's (trimmed) checkpoint.

Stage checkpoints hold only what that stage trained (models/lit_blip2.py). The next stage takes the
parts it shares, by prefix: stage 2 takes `ln_vision` and the query side of the Q-Former from stage 1
(its text parts and the ITC/ITM heads stay behind, as in BLIP-2); stage 3 takes the whole Q-Former
from stage 1 and then what stage 2 trained on top. A shape mismatch raises; checkpoint keys this
model has no place for are the other stage's own parts and are listed in the log, never loaded
somewhere else; a model key under the prefixes that no given checkpoint provides raises, naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from models.convert import CheckpointError

log = logging.getLogger(__name__)


def read_stage_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a Lightning stage checkpoint, keys without the "model." prefix."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read stage checkpoint {path}: {type(e).__name__}: {e}") from None
    if "state_dict" not in ck:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return {k.removeprefix("model."): v for k, v in ck["state_dict"].items()}


def init_from_checkpoints(model: nn.Module, sources: Iterable[tuple[str | Path, Iterable[str]]]) -> list[str]:
    """For each (checkpoint, prefixes) in order, copy its tensors under the prefixes into the model.

    Later sources overwrite earlier ones. Returns the keys that were set.
    """
    ours = model.state_dict()
    loaded: set[str] = set()
    wanted: set[str] = set()
    with torch.no_grad():
        for path, prefixes in sources:
            prefixes = tuple(prefixes)
            wanted |= {k for k in ours if k.startswith(prefixes)}
            foreign = []
            for key, t in read_stage_checkpoint(path).items():
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
            if foreign:
                log.info("%s: %d key(s) of the other stage not used here (e.g. %s)", path, len(foreign),
                         foreign[:3])
    missing = sorted(wanted - loaded)
    if missing:
        raise CheckpointError(f"no checkpoint provided model key(s) {missing[:8]}")
    return sorted(loaded)
