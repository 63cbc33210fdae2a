"""Stage checkpoints: how a finished stage writes its `final.ckpt`, and how it is read back.

A stage checkpoint holds only what that stage trained (the stage table, stages.py: its parts and
any LoRA adapters the stage added, training/lit_base.py `Trainable`), plus the resolved run config
and the stage's name. `finish_checkpoint` writes it (the one place that does, for BLIP-2
stages and VL-FAU parts alike); `load_trained` reads it back strictly into a model built the same
way (a tensor missing, extra or mis-shaped raises, naming the file); `init_from_checkpoints` /
`init_from_stage_checkpoints` start a later stage from earlier ones, by prefix: stage 2 takes
`ln_vision` and the query side of the Q-Former from stage 1 (its text parts and the ITC/ITM heads
stay behind, as in BLIP-2); stage 3 takes the whole Q-Former from stage 1 and then what stage 2
trained on top. A shape mismatch raises; checkpoint keys this model has no place for are the other
stage's own parts and are listed in the log, never loaded somewhere else; a model key under the
prefixes that no given checkpoint provides raises, naming it and the checkpoints that were to
provide it, and so does a checkpoint that provides nothing. LoRA adapters are a stage's own: never
handed on to a later stage (which adds its own, fresh, when its config asks), so they are neither
wanted from nor taken out of an earlier stage's checkpoint.

Checkpoints are read with `weights_only=True`: a file someone sent you cannot run code when it loads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from torch import nn

from expvl.models.convert.weights import CheckpointError
from expvl.models.lora import is_adapter
from expvl.training.lit_base import Trainable

log = logging.getLogger(__name__)


def finish_checkpoint(tr: L.Trainer, final: Path, cfg, **entries) -> Path:
    """Write the fitted module's trimmed weights to `final`, with the resolved config (`run_config`) and
    `entries` (e.g. `stage`), whole or not at all: a file written beside it, then renamed.

    Under DDP every rank calls this: rank 0 writes, then all meet at a barrier, so no rank returns a path
    to a file that is not there yet.
    """
    part = final.with_name(f".{final.name}.part")
    tr.save_checkpoint(part, weights_only=True)  # on every rank: Lightning writes on rank 0 only
    if tr.is_global_zero:
        ck = torch.load(part, map_location="cpu", weights_only=True)
        ck["run_config"] = json.loads(json.dumps(asdict(cfg), default=str))
        ck.update(entries)
        torch.save(ck, part)
        os.replace(part, final)
    tr.strategy.barrier("finish_checkpoint")
    return final


def read_checkpoint(path: str | Path, *, mmap: bool = False) -> dict:
    """The whole checkpoint dict (state_dict, "stage", ...); a truncated, foreign or code-carrying file
    names the path. `mmap`: tensors are mapped, not read (checking a resume point costs next to nothing)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 -- torch.load raises many types on a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ck, dict) or "state_dict" not in ck:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ck


def load_trained(model: nn.Module, path: Path, trainable: Trainable | tuple[str, ...], *,
                 stage: str | None = None) -> dict:
    """Exactly the `trainable` tensors (its prefixes and adapters) from checkpoint `path` into `model`; anything
    missing, extra or mis-shaped raises, naming the keys, and so does a checkpoint another stage wrote (when
    `stage` is given). Returns it."""
    ck = read_checkpoint(path)
    if stage is not None and ck.get("stage") != stage:
        raise CheckpointError(f"{path} was written by stage {ck.get('stage')!r}, the run's config says {stage!r}")
    tensors = checkpoint_tensors(ck)
    ours = model.state_dict()
    trained = Trainable.of(trainable)
    want = {k for k in ours if trained(k)}
    missing, unexpected = sorted(want - tensors.keys()), sorted(tensors.keys() - want)
    what = f"stage {stage!r}" if stage else "the model"
    if missing or unexpected:
        raise CheckpointError(f"{path} does not hold what {what} trained: missing {missing[:5]} "
                              f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    for key, t in tensors.items():
        if tuple(t.shape) != tuple(ours[key].shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, {what} wants {tuple(ours[key].shape)}")
    model.load_state_dict(tensors, strict=False)
    return ck


def checkpoint_tensors(ck: dict) -> dict[str, torch.Tensor]:
    """Its state_dict, keys without Lightning's "model." prefix."""
    return {k.removeprefix("model."): v for k, v in ck["state_dict"].items()}


Prefixes = tuple[str, ...] | Callable[[dict, dict, Path], tuple[str, ...]]


def init_from_checkpoints(model: nn.Module, sources: Iterable[tuple[str | Path, Prefixes]]) -> list[str]:
    """For each (checkpoint, prefixes) in order, copy its tensors under the prefixes into the model.

    `prefixes` may be a function of the checkpoint (its dict, its tensors, its path), for prefixes a file
    says itself (stages.py `init_from_stage_checkpoints`). Later sources overwrite earlier ones. Returns
    the keys that were set.
    """
    ours = model.state_dict()
    loaded: set[str] = set()
    wanted: dict[str, list[str]] = {}  # model key -> the checkpoints that were to provide it
    with torch.no_grad():
        for path, prefixes in sources:
            ck = read_checkpoint(path)
            tensors = checkpoint_tensors(ck)
            prefixes = tuple(prefixes(ck, tensors, path) if callable(prefixes) else prefixes)
            for key in ours:
                if key.startswith(prefixes) and not is_adapter(key):
                    wanted.setdefault(key, []).append(str(path))
            foreign, used = [], 0
            for key, t in tensors.items():
                if not key.startswith(prefixes) or is_adapter(key):  # adapters: the writing stage's own
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
