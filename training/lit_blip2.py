"""LightningModules for the three BLIP-2-style stages over `models.blip2.Blip2`.

- `LitPretrain`   stage 1 (BLIP-2 §3.2): Q-Former ITC + ITM + ITG, frozen image encoder.
- `LitLanguage`   stage 2 (captioning, Exp-BLIP's AU-/Emot-/Exp-BLIP) and stage 3 (instruction-aware
                  VQA, Exp-VQA): LM loss through the frozen LLM.

What each stage trains is declared once, in the stage table (stages.py), and handed in as
`trainable`. A checkpoint holds only those parameters (plus the resolved config the caller stores),
never the frozen LLM or encoder (the official checkpoints saved 13-14 GB of frozen weights per
epoch); `load_state_dict` is strict about exactly that set. A NaN or inf loss stops the run with a
message, and the last good checkpoint stays in place.
"""

from __future__ import annotations

import torch

from expvl.models.blip2 import Blip2
from expvl.models.losses import LOSS_NORMS
from expvl.models.optim import OptimConfig
from expvl.training.lit_base import PartlyFrozenModule


class _LitBlip2(PartlyFrozenModule):
    @property
    def name(self) -> str:
        return f"stage {self.model.cfg.stage!r}"

    def _step(self, batch: dict, split: str) -> dict:
        raise NotImplementedError  # each stage: its losses as a dict with "loss"

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")["loss"]

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")


class LitPretrain(_LitBlip2):
    """Stage 1. Batches: features|images, qf_ids, qf_mask, text_key, label_key (see datamodules.collate)."""

    def __init__(self, model: Blip2, *, trainable: tuple[str, ...], optim: OptimConfig, total_steps: int,
                 dec_token_id: int, pad_token_id: int, label_positives: bool = True):
        super().__init__(model, trainable=trainable, optim=optim, total_steps=total_steps)
        self.dec_token_id, self.pad_token_id = dec_token_id, pad_token_id
        self.label_positives = label_positives

    def _gather(self, x: torch.Tensor, with_grad: bool) -> torch.Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self.all_gather(x, sync_grads=with_grad).flatten(0, 1)  # (W, B, ...) -> (W*B, ...)

    def _positives(self, batch: dict) -> torch.Tensor | None:
        """Pairs that are not negatives: identical caption text, and (optionally) same label."""
        text_all = self._gather(batch["text_key"], False)
        pos = batch["text_key"][:, None] == text_all[None, :]
        if self.label_positives:
            label_all = self._gather(batch["label_key"], False)
            same = (batch["label_key"][:, None] == label_all[None, :]) & (batch["label_key"][:, None] >= 0)
            pos |= same
        return pos

    def _step(self, batch: dict, split: str) -> dict:
        out = self.model.stage1_losses(
            self.image_embeds(batch), batch["qf_ids"], batch["qf_mask"], dec_token_id=self.dec_token_id,
            pad_token_id=self.pad_token_id, positives=self._positives(batch), gather=self._gather,
            rank=self.global_rank)
        self.check_finite(out)
        B = batch["qf_ids"].shape[0]
        self.log_dict({f"{split}/{k}": v for k, v in out.items()}, prog_bar=split == "train", batch_size=B,
                      sync_dist=split != "train")
        return out


class LitLanguage(_LitBlip2):
    """Stages 2 and 3. Batches: features|images, llm_ids, llm_mask, labels, [qf_ids, qf_mask]."""

    def __init__(self, model: Blip2, *, trainable: tuple[str, ...], optim: OptimConfig, total_steps: int,
                 loss_norm: str = "batch"):
        """loss_norm: how the LM loss averages answer tokens.
        "batch"   token mean within the batch (the papers);
        "sample"  mean over sequences of each sequence's token mean (a one-word answer weighs as much
                  as a description);
        "running" token sum / the running mean of answer tokens per training batch so far: in
                  expectation the per-token weights of mixed batches, also when batches are grouped
                  by length (a batch of one-word answers then counts for little, as in a mixed batch).
        """
        super().__init__(model, trainable=trainable, optim=optim, total_steps=total_steps)
        if loss_norm not in LOSS_NORMS:
            raise ValueError(f"loss_norm {loss_norm!r}: use one of {LOSS_NORMS}")
        self.loss_norm = loss_norm
        self.seen_tokens, self.seen_batches = 0, 0  # for "running"; saved in Lightning checkpoints

    def _tokens(self, labels: torch.Tensor, split: str) -> float | None:
        """The normaliser for "running": this batch's count enters the mean before it is used."""
        if self.loss_norm != "running":
            return None
        n = int((labels != -100).sum())
        if split != "train":  # validation: the training mean, not updated
            return max(self.seen_tokens / self.seen_batches, 1.0) if self.seen_batches else max(n, 1)
        self.seen_tokens, self.seen_batches = self.seen_tokens + n, self.seen_batches + 1
        return max(self.seen_tokens / self.seen_batches, 1.0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["loss_norm_seen"] = [self.seen_tokens, self.seen_batches]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.seen_tokens, self.seen_batches = checkpoint.get("loss_norm_seen", [0, 0])

    def _step(self, batch: dict, split: str) -> dict:
        out = self.model.lm_loss(self.image_embeds(batch), batch["llm_ids"], batch["llm_mask"], batch["labels"],
                                 instruction_ids=batch.get("qf_ids"), instruction_mask=batch.get("qf_mask"),
                                 per_sample=self.loss_norm == "sample",
                                 tokens=self._tokens(batch["labels"], split))
        self.check_finite(out)
        self.log(f"{split}/loss", out["loss"], prog_bar=split == "train", batch_size=batch["llm_ids"].shape[0],
                 sync_dist=split != "train")
        return out
