"""VL-FAU training: the LightningModule, its freeze table, its batch collator and its recipe config.

- `vlfau_samples`  record -> one sample (the record itself) when it has an AU we classify.
- `VLFAUCollate`   records -> the batch `VLFAU.losses` reads: AU labels and annotation mask (B, A),
                   one "[BOS] local sentence [EOS]" row per positive (face, AU) pair with its index,
                   and the whole-face description "[BOS] caption [EOS]" per face (BLIP-2 OPT-style
                   captioning: every non-pad token is a target, as datamodules/collate.CaptionCollate).
- `LitVLFAU`       the joint objective of models/vlfau.py, AU F1 on validation, trimmed checkpoints.

What trains is declared once, in `trainable_prefixes`: ln_vision, the Q-Former (its general queries
included), the AU branch; `llm_proj` only while a language loss is on (with both weights 0 it would
receive no gradient, and DDP would stop on an unused parameter); the decoder only with
`train_language_model`; the encoder only with `vision.freeze=False`. Checkpoints hold exactly those
parameters, as models/lit_blip2.py does.
"""

from __future__ import annotations

import torch

from datamodules.collate import VisualInput
from datamodules.features import FeatureStore
from datamodules.stream import collate_records
from models.lit_base import PartlyFrozenModule, freeze_except
from models.metrics import AUMetrics
from models.optim import OptimConfig
from models.tokenizer import SPTokenizer
from models.vlfau import VLFAU, VLFAUConfig, local_description
from synthesis.records import Record


# ---------------------------------------------------------------------------------------------- data

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


# ---------------------------------------------------------------------------------------------- freezing

def trainable_prefixes(model: VLFAU) -> tuple[str, ...]:
    """The freeze table of VL-FAU (see the module docstring)."""
    cfg = model.cfg
    prefixes = ["ln_vision.", "qformer.", "au."]
    if cfg.uses_language:
        prefixes.append("llm_proj.")
        if cfg.train_language_model:
            prefixes.append("llm.")
    if model.vision is not None and not model.vision.config.freeze:
        prefixes.append("vision.")
    return tuple(prefixes)


def frozen_modules(model: VLFAU) -> list:
    return [] if model.cfg.train_language_model or model.llm is None else [model.llm]


def apply_freeze(model: VLFAU) -> dict[str, int]:
    """Set requires_grad from the table; returns trainable / total parameter counts."""
    counts = freeze_except(model, trainable_prefixes(model))
    for m in frozen_modules(model):
        m.eval()
    return counts


# ---------------------------------------------------------------------------------------------- module

class LitVLFAU(PartlyFrozenModule):
    """Batches from `VLFAUCollate`: features|images, aus, au_mask, local_*, global_*."""

    name = "VL-FAU"
    trainable_prefixes = staticmethod(trainable_prefixes)
    frozen_modules = staticmethod(frozen_modules)

    def __init__(self, model: VLFAU, *, optim: OptimConfig, total_steps: int):
        super().__init__(model, optim=optim, total_steps=total_steps)
        self.val_metrics = AUMetrics(model.cfg.aus)

    def _step(self, batch: dict, split: str) -> dict:
        out = self.model.losses(
            self.image_embeds(batch), batch["aus"], batch["au_mask"],
            local_ids=batch.get("local_ids"), local_mask=batch.get("local_mask"),
            local_labels=batch.get("local_labels"), local_index=batch.get("local_index"),
            global_ids=batch.get("global_ids"), global_mask=batch.get("global_mask"),
            global_labels=batch.get("global_labels"))
        self.check_finite(out)
        B = batch["aus"].shape[0]
        logged = {f"{split}/{k}": v for k, v in out.items() if k.startswith("loss")}
        self.log_dict(logged, prog_bar=split == "train", batch_size=B, sync_dist=split != "train")
        return out

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")["loss"]

    def validation_step(self, batch, batch_idx):
        out = self._step(batch, "val")
        preds = (out["logits"].sigmoid() > self.model.cfg.threshold).long()
        self.val_metrics.update(preds, batch["aus"].long(), batch["au_mask"])

    def on_validation_epoch_end(self) -> None:
        m = self.val_metrics.compute()
        self.log("val/au_f1", m["macro_f1"], sync_dist=False)  # counts are already summed over ranks
        self.val_metrics.reset()
