"""A cache of frozen image-encoder features, so stages with a frozen encoder run at Q-Former speed.

With a frozen encoder and no augmentation, `encoder(eval_transform(image))` is the same every epoch
and every stage. We compute it once per image and store (M, N, D) tokens in fp16 with the record
ids, keyed by a hash of the encoder's weights, its layer choice and the transform: a different
encoder or transform never reads a stale cache (it gets its own file).

The cached tokens are the encoder output *before* `ln_vision`, which trains.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from datamodules.images import load_transformed, resolve_image
from synthesis.records import Record


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


class FeatureStore:
    """Read side: `lookup(ids)` -> (B, N, D) float32 tokens."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path.with_suffix(".json")
        if not self.path.exists() or not meta_path.exists():
            raise FileNotFoundError(f"feature cache {self.path} (and {meta_path.name}) not found")
        self.meta = json.loads(meta_path.read_text())
        self.features = load_file(str(self.path))["features"]  # (M, N, D) fp16
        self.row = {rid: i for i, rid in enumerate(self.meta["ids"])}

    @property
    def key(self) -> str:
        return self.meta["key"]

    def lookup(self, ids: list[str]) -> torch.Tensor:
        missing = [i for i in ids if i not in self.row]
        if missing:
            raise KeyError(f"{self.path}: no cached features for record(s) {missing[:5]}")
        return self.features[[self.row[i] for i in ids]].float()

    @classmethod
    @torch.no_grad()
    def build(cls, encoder: torch.nn.Module, transform: Callable, records: Iterable[tuple[Record, Path]],
              cache_dir: str | Path, *, batch_size: int = 64, progress: bool = True) -> FeatureStore:
        """Encode every (record, image root) once; reuse the file if the same key was built before."""
        key = encoder_key(encoder, transform)
        path = Path(cache_dir) / f"features-{key}.safetensors"
        if path.exists() and path.with_suffix(".json").exists():
            return cls(path)
        encoder.eval()
        items = list(records)
        ids, chunks = [], []
        for start in tqdm(range(0, len(items), batch_size), desc="encoding images", disable=not progress):
            part = items[start:start + batch_size]
            images = torch.stack([load_transformed(resolve_image(r.image, root), transform) for r, root in part])
            chunks.append(encoder(images).to(torch.float16).cpu())
            ids.extend(r.id for r, _ in part)
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate record ids: features cannot be looked up unambiguously")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"features": torch.cat(chunks).contiguous()}, str(tmp))
        path.with_suffix(".json.tmp").write_text(json.dumps({"key": key, "ids": ids}))
        os.replace(path.with_suffix(".json.tmp"), path.with_suffix(".json"))
        os.replace(tmp, path)
        return cls(path)
