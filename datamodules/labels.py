"""Label targets (AU occurrence, emotion) of records, for supervised heads, linear probes and the
VL-FAU classifier's class weights; `LabelCollate` batches them with the images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from expvl.datamodules.stream import collate_records
from expvl.vocab.facs import EMOTIONS, SYNTHFACS_AUS


def au_targets(records: Sequence, aus: Sequence[str] = SYNTHFACS_AUS) -> dict[str, torch.Tensor]:
    """Records -> {"targets": (M, A) float 0/1, "annotated": (M, A) bool}."""
    targets = torch.tensor([[r.aus.get(a, 0) for a in aus] for r in records], dtype=torch.float32)
    annotated = torch.tensor([[a in r.aus for a in aus] for r in records], dtype=torch.bool)
    return {"targets": targets.reshape(len(records), len(aus)),
            "annotated": annotated.reshape(len(records), len(aus))}


def emotion_targets(records: Sequence, labels: Sequence[str] = EMOTIONS) -> torch.Tensor:
    """Records -> (M,) class index into `labels`, -1 where the record has no emotion."""
    return torch.tensor([labels.index(r.emotion) if r.emotion else -1 for r in records], dtype=torch.long)


class LabelCollate:
    """images + aus (B, A) + au_mask (B, A, annotated) + emotion (B,) with -1 for no label."""

    AUS = SYNTHFACS_AUS

    def __init__(self, aus: tuple[str, ...] = SYNTHFACS_AUS):
        self.aus = tuple(aus)

    def __call__(self, items: list[dict]) -> dict:
        batch = collate_records(items)
        recs = batch["records"]
        labels = au_targets(recs, self.aus)
        return {"images": batch["images"], "aus": labels["targets"], "au_mask": labels["annotated"],
                "emotion": emotion_targets(recs),
                "records": recs, "_pos": batch["_pos"]}
