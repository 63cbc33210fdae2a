"""What every converter shares: reading checkpoint files and copying them through a strict map.

`read_weights` reads one file (safetensors, or a torch file with `weights_only=True`) or a Hugging
Face folder's shards, reading only the keys a loader asks for. `load_mapped` copies tensors through an
explicit {our key: their key} map and refuses to guess: a key the map expects but the checkpoint lacks,
a checkpoint key the map does not know, and a shape mismatch each raise `CheckpointError` naming the
key.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

KeyFilter = Callable[[str], bool]


class CheckpointError(RuntimeError):
    """A checkpoint that does not fit the model: missing, unexpected or mis-shaped keys."""


def read_state_dict(path, *, keep: KeyFilter | None = None, dtype: torch.dtype | None = None
                    ) -> dict[str, torch.Tensor]:
    """Read a .safetensors or a torch pickle (weights only) file; name the file in any error.

    `keep`: only the keys it accepts are read (a .safetensors file reads nothing else; a torch file is
    memory-mapped, so the rest is never paged in): one part of a whole vision-language checkpoint
    without the 7B LLM beside it. `dtype`: floating tensors are cast as they are read, so a file
    stored in fp32 never sits in memory whole in fp32.
    """
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                names = list(f.keys())  # a safe_open handle, not a dict: keys() is its listing
                return {k: _cast(f.get_tensor(k), dtype) for k in names if keep is None or keep(k)}
        # memory-mapped unless the file predates torch 1.6's zip format, which cannot be mapped
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # truncated, corrupt, or not a checkpoint at all
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # LAVIS wraps the weights as {"model": ..., "optimizer": ...}
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: _cast(v, dtype) for k, v in obj.items() if keep is None or keep(k)}


def _cast(t, dtype: torch.dtype | None):
    return t.to(dtype) if dtype is not None and isinstance(t, torch.Tensor) and t.is_floating_point() else t


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of a Hugging Face folder: a sharded index's shards, else a single file."""
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


def read_weights(path, *, keep: KeyFilter | None = None, dtype: torch.dtype | None = None
                 ) -> dict[str, torch.Tensor]:
    """One state dict from a checkpoint file, or from a Hugging Face folder's shards (a key found in
    two shards is an error naming them); `keep`, `dtype` as in `read_state_dict`."""
    path = Path(path)
    if not path.is_dir():
        return read_state_dict(path, keep=keep, dtype=dtype)
    source: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        part = read_state_dict(f, keep=keep, dtype=dtype)
        clash = sorted(set(part) & set(source))
        if clash:
            raise CheckpointError(f"{f}: key(s) {clash[:4]} also appear in another shard")
        source.update(part)
    return source


def load_mapped(model: nn.Module, source: Mapping[str, torch.Tensor], key_map: Mapping[str, str], *,
                ignore: Iterable[str] = (), transforms: Mapping[str, callable] | None = None,
                what: str = "checkpoint") -> None:
    """Copy `source[src]` into `model`'s parameter `dst` for every `dst: src` in `key_map`.

    `key_map` must cover every parameter and buffer of `model` that is in its state dict; every
    source key must be used or listed in `ignore` (exact names). `transforms[dst]` may reshape or
    convert a tensor (e.g. fuse or permute) before the shape check.
    """
    transforms = transforms or {}
    ours = model.state_dict()
    ignore = set(ignore)
    missing_dst = sorted(set(ours) - set(key_map))
    if missing_dst:
        raise CheckpointError(f"{what}: the weight map has no entry for model key(s) {missing_dst[:8]}"
                              f"{' ...' if len(missing_dst) > 8 else ''}")
    extra_dst = sorted(set(key_map) - set(ours))
    if extra_dst:
        raise CheckpointError(f"{what}: the weight map names key(s) the model lacks {extra_dst[:8]}")
    absent = sorted(src for src in key_map.values() if src not in source)
    if absent:
        raise CheckpointError(f"{what}: missing key(s) {absent[:8]}{' ...' if len(absent) > 8 else ''}")
    unexpected = sorted(set(source) - set(key_map.values()) - ignore)
    if unexpected:
        raise CheckpointError(f"{what}: unexpected key(s) {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}")
    new_state = {}
    for dst, src in key_map.items():
        t = source[src]
        if dst in transforms:
            t = transforms[dst](t)
        if tuple(t.shape) != tuple(ours[dst].shape):
            raise CheckpointError(f"{what}: {src} has shape {tuple(t.shape)}, "
                                  f"model key {dst} wants {tuple(ours[dst].shape)}")
        new_state[dst] = t
    # assign=True keeps meta-device models usable for shape-only checks of full-size configs
    model.load_state_dict(new_state, strict=True, assign=any(p.is_meta for p in ours.values()))
