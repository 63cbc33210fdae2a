"""A cache of frozen image-encoder features, so stages with a frozen encoder run at Q-Former speed.

With a frozen encoder and no augmentation, `encoder(eval_transform(image))` is the same every epoch
and every stage. We compute it once per image and store (M, N, D) tokens in fp16 with the record
ids, keyed by a hash of the encoder's weights, its layer choice, the transform and the images (ids,
paths, sizes, modification times): a different encoder, transform or image set never reads a stale
cache (it gets its own file).

The tokens go to a memory-mapped `.npy` file (numpy's format, read with `np.load(mmap_mode="r")`),
written batch by batch: at real scale (EVA ViT-g, 257 x 1408 tokens, ~0.7 MB per image in fp16, ~100
GB for BP4D) neither building nor reading holds the whole cache in RAM. An interrupted build resumes
at the last batch it recorded. The cached tokens are the encoder output *before* `ln_vision`, which
trains.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from expvl.datamodules.images import load_transformed, resolve_image
from expvl.vocab.records import Record
from expvl.vocab.shards import atomic_write

_SAVE_EVERY = 16  # batches between progress records of a build (what an interruption can cost)


def encoder_key(encoder: torch.nn.Module, transform: Callable) -> str:
    """sha256 over the encoder's weights, its class and layer, and the transform's repr (16 hex)."""
    h = hashlib.sha256()
    h.update(type(encoder).__name__.encode())
    h.update(repr(getattr(encoder, "layer_index", None)).encode())
    h.update(repr(transform).encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def images_key(items: list[tuple[Record, Path]]) -> str:
    """sha256 over each record's id, image path as the record gives it, file size and mtime (16 hex):
    cheap, and any rewrite of an image (or a different record set) changes it. The path is the record's
    (relative to its dataset root), not the resolved one: a run folder copied with `cp -a` keeps its
    cache, and so every step keyed on it."""
    h = hashlib.sha256()
    for record, root in items:
        st = resolve_image(record.image, root).stat()
        h.update(f"{record.id}\0{record.image}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class FeatureStore:
    """Read side: `lookup(ids)` -> (B, N, D) float32 tokens, read from the memory-mapped file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path.with_suffix(".json")
        if not self.path.exists() or not meta_path.exists():
            raise FileNotFoundError(f"feature cache {self.path} (and {meta_path.name}) not found")
        self.meta = json.loads(meta_path.read_text())
        self.row = {rid: i for i, rid in enumerate(self.meta["ids"])}
        self._features: np.ndarray | None = None

    @property
    def features(self) -> np.ndarray:  # (M, N, D) fp16, opened lazily (once per DataLoader worker)
        if self._features is None:
            self._features = np.load(self.path, mmap_mode="r")
        return self._features

    def __getstate__(self) -> dict:  # workers reopen the file instead of receiving a pickled copy
        return {**self.__dict__, "_features": None}

    @property
    def key(self) -> str:
        return self.meta["key"]

    def lookup(self, ids: list[str]) -> torch.Tensor:
        missing = [i for i in ids if i not in self.row]
        if missing:
            raise KeyError(f"{self.path}: no cached features for record(s) {missing[:5]}")
        return torch.from_numpy(self.features[[self.row[i] for i in ids]]).float()

    @classmethod
    @torch.no_grad()
    def build(cls, encoder: torch.nn.Module, transform: Callable, records: Iterable[tuple[Record, Path]],
              cache_dir: str | Path, *, batch_size: int = 64, progress: bool = True) -> FeatureStore:
        """Encode every (record, image root) once, on the encoder's device; reuse the file if the same
        key was built before, and continue an interrupted build of the same key."""
        items = list(records)
        ids = [r.id for r, _ in items]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate record ids: features cannot be looked up unambiguously")
        key = f"{encoder_key(encoder, transform)}-{images_key(items)}"
        path = Path(cache_dir) / f"features-{key}.npy"
        if path.exists() and path.with_suffix(".json").exists():
            return cls(path)
        partial, progress_path = path.with_suffix(".npy.partial"), path.with_suffix(".progress.json")
        encoder.eval()
        device = next(encoder.parameters()).device

        def encode(part: list[tuple[Record, Path]]) -> torch.Tensor:
            images = [load_transformed(resolve_image(r.image, root), transform) for r, root in part]
            return encoder(torch.stack(images).to(device))

        done, out = 0, None
        if partial.exists() and progress_path.exists():
            done = json.loads(progress_path.read_text())["rows"]
            out = np.load(partial, mmap_mode="r+")
        starts = range(done, len(items), batch_size)
        for i, start in enumerate(tqdm(starts, desc="encoding images", disable=not progress)):
            tokens = encode(items[start:start + batch_size]).to(torch.float16).cpu().numpy()
            if out is None:  # the first batch tells the shape
                partial.parent.mkdir(parents=True, exist_ok=True)
                out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16,
                                                shape=(len(items), *tokens.shape[1:]))
            out[start:start + len(tokens)] = tokens
            if (i + 1) % _SAVE_EVERY == 0:  # rows are on disk before the progress record says so
                out.flush()
                progress_path.write_text(json.dumps({"rows": start + len(tokens)}))
        if out is None:
            raise ValueError(f"no images to encode into {path}")
        out.flush()
        del out
        atomic_write(path.with_suffix(".json"), json.dumps({"key": key, "ids": ids}).encode())
        os.replace(partial, path)
        progress_path.unlink(missing_ok=True)
        return cls(path)
