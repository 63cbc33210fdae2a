"""What every LightningModule over a partly frozen model shares: freezing applied by one function,
trimmed strict checkpoints, frozen parts kept in eval mode, the optimizer, and the NaN guard.

The caller says what trains (`trainable`: parameter-name prefixes, from the stage table in
stages.py or VL-FAU's in lit_vlfau.py); `freeze` turns every other parameter off, and any direct
submodule left with no trainable parameter (the frozen LLM, the frozen encoder) stays in eval mode
whatever the trainer does. The wrapped model is `self.model` and exposes `vision`, `encode_image` and
`embed_features`.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from expvl.models.optim import OptimConfig, build_optimizer


def freeze(model: nn.Module, trainable: tuple[str, ...]) -> dict[str, int]:
    """requires_grad only for parameters under the `trainable` prefixes, frozen submodules in eval mode;
    returns trainable / total parameter counts. The one place where anything is frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(trainable))
    for m in frozen_children(model):
        m.eval()
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trained, "total": total}


def frozen_children(model: nn.Module) -> list[nn.Module]:
    """Direct submodules with parameters, none of them trainable: no dropout, BatchNorm statistics kept."""
    return [m for m in model.children()
            if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())]


class PartlyFrozenModule(L.LightningModule):
    name = "model"  # for messages

    def __init__(self, model: nn.Module, *, trainable: tuple[str, ...], optim: OptimConfig, total_steps: int):
        super().__init__()
        self.model = model
        self.trainable = tuple(trainable)
        self.optim_cfg = optim
        self.total_steps = total_steps
        self.counts = freeze(model, self.trainable)

    # ---- trimmed, strict checkpoints ------------------------------------------------------------

    def _kept(self, key: str) -> bool:
        return key.startswith(tuple("model." + p for p in self.trainable))

    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if self._kept(k))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        want = {k for k in super().state_dict() if self._kept(k)}
        got = set(state_dict)
        if strict and want != got:
            raise RuntimeError(f"checkpoint does not match the trained parameters of {self.name}: missing "
                               f"{sorted(want - got)[:5]}, unexpected {sorted(got - want)[:5]}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # ---- training plumbing ----------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self.print(f"[{self.name}] trainable parameters: {self.counts['trainable']:,} of {self.counts['total']:,}")

    def train(self, mode: bool = True):
        super().train(mode)
        for m in frozen_children(self.model):
            m.eval()
        return self

    def configure_optimizers(self):
        vision = self.model.vision
        depth = vision.num_layers if vision is not None and not vision.config.freeze else 0  # for LLRD
        opt, sched = build_optimizer(self.model, self.optim_cfg, total_steps=self.total_steps, vit_depth=depth)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def image_embeds(self, batch: dict) -> torch.Tensor:
        if "features" in batch:
            return self.model.embed_features(batch["features"])
        return self.model.encode_image(batch["images"])

    def check_finite(self, out: dict) -> None:
        if not math.isfinite(float(out["loss"].detach())):
            parts = {k: float(v.detach()) for k, v in out.items() if k.startswith("loss")}
            raise FloatingPointError(f"non-finite loss at step {self.global_step}: {parts}; stopping. "
                                     "The last checkpoint written before this step is intact.")
