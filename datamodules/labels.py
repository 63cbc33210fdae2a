"""Collation of label targets (AU occurrence, emotion) for supervised heads and linear probes."""

from __future__ import annotations

import torch

from datamodules.stream import collate_records
from synthesis.facs import EMOTIONS, SYNTHFACS_AUS


class LabelCollate:
    """images + aus (B, A) + au_mask (B, A, annotated) + emotion (B,) with -1 for no label."""

    AUS = SYNTHFACS_AUS

    def __init__(self, aus: tuple[str, ...] = SYNTHFACS_AUS):
        self.aus = tuple(aus)

    def __call__(self, items: list[dict]) -> dict:
        batch = collate_records(items)
        recs = batch["records"]
        aus = torch.tensor([[r.aus.get(a, 0) for a in self.aus] for r in recs], dtype=torch.float32)
        mask = torch.tensor([[a in r.aus for a in self.aus] for r in recs], dtype=torch.bool)
        emotion = torch.tensor([EMOTIONS.index(r.emotion) if r.emotion else -1 for r in recs])
        return {"images": batch["images"], "aus": aus, "au_mask": mask, "emotion": emotion,
                "records": recs, "_pos": batch["_pos"]}
