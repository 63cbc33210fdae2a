"""VL-FAU training: the LightningModule and its freeze table (the batches: datamodules/vlfau.py).

`LitVLFAU` trains the joint objective of models/vlfau.py, reports AU F1 on validation, and keeps
trimmed checkpoints. What trains is declared once, in `trainable_prefixes`: ln_vision, the Q-Former
(its general queries included), the AU branch; `llm_proj` only while a language loss is on (with
both weights 0 it would receive no gradient, and DDP would stop on an unused parameter); the decoder
only with `train_language_model`; the encoder only with `vision.freeze=False`. Checkpoints hold
exactly those parameters, as the BLIP-2 stages' do (lit_blip2.py).
"""

from __future__ import annotations

from expvl.evaluation.metrics import AUMetrics
from expvl.models.optim import OptimConfig
from expvl.models.vlfau import VLFAU
from expvl.training.lit_base import PartlyFrozenModule

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


# ---------------------------------------------------------------------------------------------- module

class LitVLFAU(PartlyFrozenModule):
    """Batches from `VLFAUCollate`: features|images, aus, au_mask, local_*, global_*."""

    name = "VL-FAU"

    def __init__(self, model: VLFAU, *, optim: OptimConfig, total_steps: int):
        super().__init__(model, trainable=trainable_prefixes(model), optim=optim, total_steps=total_steps)
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
