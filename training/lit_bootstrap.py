"""Building the "pretrained" parts that real runs download, for the offline embedded default.

Real recipes load EVA ViT-g and Vicuna-7B from local files. Offline, `python train.py` trains
small stand-ins first and then freezes them, so that stages 1-3 run exactly as in the papers:

- `LitEncoderPretrain`: the tiny image tower with supervised AU (multi-label BCE) and emotion (CE)
  heads on the pooled tokens of the layer BLIP-2 reads. A conv tower learns SynthFACS AUs on a
  CPU budget, a plain patch ViT does not (models/vision.py's docstring says why).
- `LitCausalLM`: the tiny LLaMA trained as a plain causal LM on the synthesized text (captions and
  question/answer strings), so the frozen LLM already "speaks" the answer language and the
  Q-Former only has to supply what the image shows.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from expvl.models.llm import LLaMA
from expvl.models.losses import au_bce, lm_loss, predicted_positions
from expvl.models.optim import OptimConfig, build_optimizer
from expvl.models.vision import VisionEncoder


class _Bootstrap(L.LightningModule):
    """Train / val steps through `_step`, AdamW with the warm-up + cosine schedule over all parameters."""

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        opt, sched = build_optimizer(self, self.optim_cfg, total_steps=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LitEncoderPretrain(_Bootstrap):
    """Batches: images (B, 3, S, S), aus (B, A) 0/1, au_mask (B, A), emotion (B,) with -1 = none."""

    def __init__(self, encoder: VisionEncoder, *, num_aus: int, num_emotions: int, optim: OptimConfig,
                 total_steps: int, emotion_weight: float = 1.0):
        super().__init__()
        if encoder.config.freeze:
            raise ValueError("the encoder to pretrain must be built with freeze=False")
        self.encoder = encoder
        # heads read all tokens (flattened), not their mean: where an AU shows matters (brows vs
        # mouth), and a conv tower's tokens carry no position embedding for the mean to keep
        self.au_head = nn.Linear(encoder.width * encoder.num_tokens, num_aus)
        self.emotion_head = nn.Linear(encoder.width * encoder.num_tokens, num_emotions)
        self.optim_cfg, self.total_steps, self.emotion_weight = optim, total_steps, emotion_weight
        # NHWC activations and conv weights: oneDNN's (and cuDNN's) fast layout for these convolutions.
        # Values are unchanged up to rounding, and so are the saved weights' shapes.
        self.encoder.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.contiguous(memory_format=torch.channels_last)
        tokens = self.encoder(images).flatten(1)  # (B, N*D): the tokens stage 1 will read
        return {"au_logits": self.au_head(tokens), "emotion_logits": self.emotion_head(tokens)}

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        out = self(batch["images"])
        loss_au = au_bce(out["au_logits"], batch["aus"], annotated=batch["au_mask"])
        has_emotion = batch["emotion"] >= 0
        loss_emo = (nn.functional.cross_entropy(out["emotion_logits"][has_emotion], batch["emotion"][has_emotion])
                    if has_emotion.any() else out["emotion_logits"].sum() * 0)
        loss = loss_au + self.emotion_weight * loss_emo
        B = batch["images"].shape[0]
        self.log_dict({f"{split}/loss": loss, f"{split}/loss_au": loss_au, f"{split}/loss_emotion": loss_emo},
                      prog_bar=split == "train", batch_size=B)
        return loss



class LitCausalLM(_Bootstrap):
    """Batches: input_ids (B, T), attention_mask (B, T); loss on every non-pad next token."""

    def __init__(self, llm: LLaMA, *, optim: OptimConfig, total_steps: int):
        super().__init__()
        self.llm = llm
        self.optim_cfg, self.total_steps = optim, total_steps

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        logits = self.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          logits_at=predicted_positions(labels))["logits"]  # not at padding
        loss = lm_loss(logits, labels)
        self.log(f"{split}/loss", loss, prog_bar=split == "train", batch_size=labels.shape[0])
        return loss

