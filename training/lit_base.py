"""What every LightningModule over a partly frozen model shares: freezing applied by one function,
trimmed strict checkpoints, frozen parts kept in eval mode, the optimizer, and the NaN guard.

The caller says what trains (`trainable`: a `Trainable`, or a tuple of parameter-name prefixes, from
the stage table in stages.py or VL-FAU's in lit_vlfau.py). A `Trainable` names whole parts by prefix
("qformer.") and adapters by a marker, a name part they start with wherever they sit: LoRA adapters
(models/lora.py) live inside the frozen LLM, `llm.model.layers.0.self_attn.q_proj.lora_A.default.weight`
next to the frozen `...q_proj.base_layer.weight`. `freeze` turns every other parameter off;
checkpoints hold exactly the trained ones, the adapters included (checkpoints.py `load_trained` reads
them back with the same `Trainable`).

Modes: any direct submodule whose parameters are all frozen, adapters aside (the frozen LLM with
adapters in it, the frozen encoder), stays in eval mode whatever the trainer does, so no dropout acts in
it and BatchNorm keeps its statistics; only the adapter modules inside it follow the trainer's mode (a
LoRA dropout > 0 acts in training: models/lora.py, 0 by default, so then nothing drops out at all). The
wrapped model is `self.model` and exposes `vision`, `encode_image` and `embed_features`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from expvl.models.optim import OptimConfig, build_optimizer


@dataclass(frozen=True)
class Trainable:
    """Which parameters train, and so which a checkpoint holds: names under one of `prefixes`, and names with a
    dotted part starting with one of `markers` wherever they are (adapters inside frozen modules)."""
    prefixes: tuple[str, ...]  # whole parts: "qformer.", "llm_proj.", "vision." (an unfrozen encoder)
    markers: tuple[str, ...] = ()  # adapters: "lora_" (models/lora.py LORA_MARKER)

    def __call__(self, name: str) -> bool:
        return name.startswith(self.prefixes) or self.marked(name)

    def marked(self, name: str) -> bool:
        """Whether `name` (a parameter's or a module's) is an adapter's."""
        return bool(self.markers) and any(part.startswith(self.markers) for part in name.split("."))

    @classmethod
    def of(cls, spec: Trainable | tuple[str, ...]) -> Trainable:
        """`spec` itself, or a tuple of prefixes as a Trainable (VL-FAU's table is prefixes only)."""
        return spec if isinstance(spec, Trainable) else cls(tuple(spec))


def freeze(model: nn.Module, trainable: Trainable | tuple[str, ...]) -> dict[str, int]:
    """requires_grad only for the `trainable` parameters, frozen submodules in eval mode; returns trainable /
    total parameter counts. The one place where anything is frozen."""
    spec = Trainable.of(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(spec(name))
    keep_frozen_in_eval(model, spec, training=model.training)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trained, "total": total}


def frozen_children(model: nn.Module, trainable: Trainable | tuple[str, ...] = ()) -> list[nn.Module]:
    """Direct submodules with parameters, none of them trainable apart from `trainable`'s adapters (a frozen LLM
    with LoRA in it counts): no dropout, BatchNorm statistics kept."""
    spec = Trainable.of(trainable)
    out = []
    for name, m in model.named_children():
        own = [p for n, p in m.named_parameters(prefix=name) if not spec.marked(n)]
        if own and not any(p.requires_grad for p in own):
            out.append(m)
    return out


def keep_frozen_in_eval(model: nn.Module, trainable: Trainable | tuple[str, ...], *, training: bool) -> None:
    """Frozen children into eval mode; the adapter modules inside them (LoRA's dropout) in `training` mode."""
    spec = Trainable.of(trainable)
    for m in frozen_children(model, spec):
        m.eval()
    if spec.markers:
        for name, m in model.named_modules():
            if spec.marked(name):
                m.train(training)


class PartlyFrozenModule(L.LightningModule):
    name = "model"  # for messages

    def __init__(self, model: nn.Module, *, trainable: Trainable | tuple[str, ...], optim: OptimConfig,
                 total_steps: int):
        super().__init__()
        self.model = model
        self.trainable = Trainable.of(trainable)
        self.optim_cfg = optim
        self.total_steps = total_steps
        self.counts = freeze(model, self.trainable)

    # ---- trimmed, strict checkpoints ------------------------------------------------------------

    def _kept(self, key: str) -> bool:
        return key.startswith("model.") and self.trainable(key[len("model."):])

    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if self._kept(k))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        want = {k for k in super().state_dict() if self._kept(k)}
        got = set(state_dict)
        if strict and want != got:
            missing, unexpected = sorted(want - got), sorted(got - want)
            raise RuntimeError(f"checkpoint does not match the trained parameters of {self.name}: missing "
                               f"{missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # ---- training plumbing ----------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self.print(f"[{self.name}] trainable parameters: {self.counts['trainable']:,} of {self.counts['total']:,}")

    def train(self, mode: bool = True):
        super().train(mode)
        keep_frozen_in_eval(self.model, self.trainable, training=mode)
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
