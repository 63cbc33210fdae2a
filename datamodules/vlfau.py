"""VL-FAU's samples and batches (the model: models/vlfau.py; its training: training/lit_vlfau.py).

- `vlfau_samples`  record -> one sample (the record itself) when it has an AU we classify.
- `VLFAUCollate`   records -> the batch `VLFAU.losses` reads: AU labels and annotation mask (B, A),
                   one "[BOS] local sentence [EOS]" row per positive (face, AU) pair with its index,
                   and the whole-face description "[BOS] caption [EOS]" per face (BLIP-2 OPT-style
                   captioning: every non-pad token is a target, as collate.CaptionCollate).
"""

from __future__ import annotations

import torch

from expvl.datamodules.collate import VisualInput
from expvl.datamodules.features import FeatureStore
from expvl.datamodules.stream import collate_records
from expvl.models.tokenizer import SPTokenizer
from expvl.models.vlfau import VLFAUConfig, local_description
from expvl.vocab.records import Record


class vlfau_samples:
    """Record -> [{}] (one sample: the record) if it annotates at least one of `aus`, else []."""

    def __init__(self, aus: list[str]):
        self.aus = list(aus)

    def __call__(self, record: Record) -> list[dict]:
        return [{}] if any(a in record.aus for a in self.aus) else []


class VLFAUCollate(VisualInput):
    def __init__(self, llm_tokenizer: SPTokenizer, cfg: VLFAUConfig, features: FeatureStore | None = None):
        super().__init__(features)
        self.tok, self.cfg = llm_tokenizer, cfg

    def _caption_batch(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        enc = self.tok.batch_encode(texts, max_length=max_length, bos=True, eos=True, padding_side="right",
                                    truncation_side="right")
        return {"ids": enc["input_ids"], "mask": enc["attention_mask"],
                "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}

    def encode(self, records: list[Record]) -> dict:
        """The text and label part of a batch (no images)."""
        A = self.cfg.num_aus
        aus = torch.zeros(len(records), A)
        au_mask = torch.zeros(len(records), A, dtype=torch.bool)
        local_texts, local_index, global_texts = [], [], []
        for b, r in enumerate(records):
            for a, au in enumerate(self.cfg.aus):
                if au not in r.aus:
                    continue
                au_mask[b, a] = True
                aus[b, a] = float(bool(r.aus[au]))
                if r.aus[au]:
                    intensity = r.intensities.get(au) if self.cfg.local_adverbs else None
                    local_texts.append(local_description(au, intensity))
                    local_index.append((b, a))
            if self.cfg.global_weight > 0:
                if self.cfg.global_caption not in r.captions:
                    raise ValueError(f"record {r.id}: no caption {self.cfg.global_caption!r} for the global "
                                     f"description (it has {sorted(r.captions)}); set model.global_caption "
                                     "or model.global_weight=0")
                global_texts.append(r.captions[self.cfg.global_caption])
        batch = {"aus": aus, "au_mask": au_mask,
                 "local_index": torch.tensor(local_index, dtype=torch.long).reshape(-1, 2),
                 "local_texts": local_texts}
        if local_texts:
            loc = self._caption_batch(local_texts, self.cfg.max_local_len)
        else:
            loc = {k: torch.zeros(0, 1, dtype=torch.long) for k in ("ids", "mask", "labels")}
        batch.update(local_ids=loc["ids"], local_mask=loc["mask"], local_labels=loc["labels"])
        if global_texts:
            glo = self._caption_batch(global_texts, self.cfg.max_global_len)
            batch.update(global_ids=glo["ids"], global_mask=glo["mask"], global_labels=glo["labels"],
                         global_texts=global_texts)
        return batch

    def __call__(self, items: list[dict]) -> dict:
        batch = collate_records(items)
        return {**self.visual(batch), **self.encode(batch["records"]), "records": batch["records"],
                "_pos": batch["_pos"]}


