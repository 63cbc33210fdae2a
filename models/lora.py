"""LoRA adapters (peft's) on the frozen LLM and, optionally, the image encoder; merged back for export.

    apply_lora(model, cfg)    a BLIP-2-style model's `llm` (cfg.target_modules) and, when asked, its
                              `vision` tower (cfg.vision_target_modules) get adapters, in place;
                              returns the adapter parameter names
    add_adapters(module, targets, cfg)   the same on one module (a bare decoder); `target_layers` the
                              layers it would adapt, refusing a name that matches none
    merge_lora(module)        folds every adapter into its base weight and puts the plain layer back:
                              same outputs (to fp32 rounding), no LoRA parameter left (export)
    is_adapter(name)          whether a parameter / module name is an adapter's

`LoRAConfig` is a stage's setting (`stage3.lora.rank=8`); rank 0 leaves the model as it is. The
adapters are peft's (`peft.inject_adapter_in_model` on a plain nn.Module), not written here: each
targeted nn.Linear (or nn.Conv2d) becomes a peft `lora.Linear` holding the original layer as
`base_layer` and the adapter as `lora_A` / `lora_B`, so parameter names read
`llm.model.layers.0.self_attn.q_proj.lora_A.default.weight` next to `...q_proj.base_layer.weight`.
Every adapter name has a part starting with `LORA_MARKER`: that is how training tells adapters from
the frozen weights around them (training/lit_base.py `Trainable`). lora_B starts at zero (peft's
default), so a freshly adapted model computes exactly what the plain one did.

Adapters are kept in fp32 on an fp16 / bf16 base (peft's `cast_adapter_dtype`): they are what trains,
and AdamW updates of ~1e-3 relative size vanish in fp16.

peft is imported inside the functions: importing it pulls in transformers (2-3 s), and every config
load imports this file (configs/schema.py holds a LoRAConfig per stage).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

LORA_MARKER = "lora_"  # peft's prefix of every LoRA module and parameter name (peft LoraModel.prefix)
ADAPTER_NAME = "default"  # peft's adapter name; one adapter per layer here
LAYER_TYPES = (nn.Linear, nn.Conv2d)  # what may be targeted: layers peft adapts and merges exactly


@dataclass
class LoRAConfig:
    rank: int = 0  # adapter rank r (the update of a weight W is B @ A, A: r x in, B: out x r); 0 = no adapters
    alpha: float = 16.0  # the update is scaled by alpha / rank (so changing the rank keeps its size)
    dropout: float = 0.0  # dropout on each adapter's input during training. 0 by default: the frozen
    #   LLM itself always runs in eval mode (training/lit_base.py), so with 0 nothing in the model drops out
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # names of the layers
    #   inside the LLM that get adapters (the LoRA paper's choice by default). A name matches a layer
    #   whose dotted name is it or ends in "." + it. LLaMA: q_proj k_proj v_proj o_proj gate_proj up_proj
    #   down_proj; OPT: q_proj k_proj v_proj out_proj fc1 fc2. A name matching no layer is refused
    vision_target_modules: list[str] = field(default_factory=list)  # layers of the image encoder that get
    #   adapters too (same rank, alpha, dropout); [] = the encoder stays as it is. open_clip ViTs: c_fc
    #   c_proj (their attention is one nn.MultiheadAttention, whose projections cannot be adapted); the
    #   conv stand-in: conv1 conv2 conv3. Only where the stage sees images (mode: stage): the embedded
    #   default trains on cached features of the frozen encoder

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def check(self, key: str = "lora", *, has_llm: bool = True, sees_images: bool = True) -> None:
        """Refuse values no model could use, naming `key` (e.g. "stage3.lora"); `has_llm`: whether the stage
        has an LLM to adapt, `sees_images`: whether its images go through the encoder (not cached features)."""
        if self.rank < 0:
            raise ValueError(f"{key}.rank must be >= 0 (0 = no adapters), got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{key}.dropout must be in [0, 1), got {self.dropout}")
        if not self.enabled:
            return
        if self.alpha <= 0:
            raise ValueError(f"{key}.alpha must be > 0, got {self.alpha}")
        if not has_llm:
            raise ValueError(f"{key}.rank={self.rank}: this stage has no LLM to adapt (stage 1 trains the Q-Former "
                             "alone); LoRA applies to stages 2 and 3 (stage2.lora, stage3.lora)")
        if not self.target_modules:
            raise ValueError(f"{key}.target_modules is empty: name the LLM layers to adapt (e.g. [q_proj, v_proj]), "
                             f"or set {key}.rank=0")
        if self.vision_target_modules and not sees_images:
            raise ValueError(f"{key}.vision_target_modules={list(self.vision_target_modules)}: the embedded default "
                             "(mode: pipeline) trains on cached features of the frozen encoder, which adapters in "
                             "the encoder would never change; use mode: stage, or leave it []")


def is_adapter(name: str) -> bool:
    """Whether a parameter or module name (dotted) is a LoRA adapter's: a part starts with LORA_MARKER."""
    return any(part.startswith(LORA_MARKER) for part in name.split("."))


def adapter_names(module: nn.Module) -> list[str]:
    """The names of `module`'s adapter parameters."""
    return [n for n, _ in module.named_parameters() if is_adapter(n)]


def adaptable_layers(module: nn.Module) -> list[str]:
    """Dotted names of the layers of `module` LoRA can adapt: nn.Linear / nn.Conv2d, except the output
    projection of an nn.MultiheadAttention, whose weight the attention reads directly (an adapter there
    would never run)."""
    inside_mha = {f"{n}.out_proj" for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return [n for n, m in module.named_modules() if isinstance(m, LAYER_TYPES) and n not in inside_mha]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def target_layers(module: nn.Module, targets: Iterable[str], *, where: str = "the module") -> list[str]:
    """The dotted names of the layers of `module` that `targets` name; a target matching none raises, listing
    the names of the layers `module` can adapt. So does a module that has adapters already."""
    if adapter_names(module):
        raise ValueError(f"{where} has LoRA adapters already ({adapter_names(module)[:2]}, ...): adapters are added "
                         "once, to a decoder of its own (training/stages.py build_stage_model copies a shared one)")
    layers = adaptable_layers(module)
    for target in targets:
        if not any(_matches(n, target) for n in layers):
            short = sorted({n.rpartition(".")[2] for n in layers})
            mha = any(_matches(f"{n}.out_proj", target) for n, m in module.named_modules()
                      if isinstance(m, nn.MultiheadAttention))
            why = " (it is an nn.MultiheadAttention's output projection, whose weight the attention reads " \
                  "directly: an adapter there would never run)" if mha else ""
            raise ValueError(f"LoRA target module {target!r} matches no layer of {where} ({type(module).__name__})"
                             f"{why}; its adaptable layers are named {short}")
    return [n for n in layers if any(_matches(n, t) for t in targets)]


def add_adapters(module: nn.Module, targets: Iterable[str], cfg: LoRAConfig, *, where: str = "the module") -> list[str]:
    """peft LoRA adapters (cfg's rank, alpha, dropout) on the layers of `module` that `targets` name, in place;
    returns the new adapter parameter names (relative to `module`). Refused as `target_layers` says."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.functional import cast_adapter_dtype

    cfg.check()
    if not cfg.enabled:
        return []
    chosen = target_layers(module, targets, where=where)
    # the exact names found above, so that peft adapts precisely the layers checked here
    inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                       target_modules=chosen, bias="none"), module, adapter_name=ADAPTER_NAME)
    cast_adapter_dtype(module, ADAPTER_NAME, autocast_adapter_dtype=True)  # fp16 / bf16 base: fp32 adapters
    return adapter_names(module)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """cfg's adapters into a BLIP-2-style model, in place: its `llm` (cfg.target_modules) and, with
    cfg.vision_target_modules, its `vision` tower. Returns the adapter parameter names (relative to
    `model`); nothing happens at rank 0. Every target is checked before anything is injected. Apply it
    after the decoder is built and before any checkpoint that holds adapters loads (their names only exist
    afterwards)."""
    cfg.check()
    if not cfg.enabled:
        return []
    llm = getattr(model, "llm", None)
    if llm is None:
        raise ValueError(f"{type(model).__name__} has no LLM (`llm`) to adapt: LoRA is for the stages with a "
                         "decoder (2 and 3); stage 1 has none")
    parts = [("llm", llm, cfg.target_modules, "the LLM")]
    if cfg.vision_target_modules:
        vision = getattr(model, "vision", None)
        if vision is None:
            raise ValueError(f"{type(model).__name__} has no image encoder (`vision`) for vision_target_modules")
        parts.append(("vision", vision, cfg.vision_target_modules, "the image encoder"))
    for _, module, targets, where in parts:  # all refusals before any change
        target_layers(module, targets, where=where)
    return [f"{attr}.{n}" for attr, module, targets, where in parts
            for n in add_adapters(module, targets, cfg, where=where)]


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA adapter in `module` into its base layer's weight (W + alpha / r * B @ A) and put the plain
    layer back in its place, in place; returns `module`, which then has no LoRA parameter left and computes
    what the adapted one did (to fp32 rounding; an fp16 base takes the sum rounded to fp16)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    # outermost adapted layers only (a peft layer's own submodules are not separate ones)
    adapted = [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in adapted:
        layer.merge(safe_merge=True)  # safe_merge: a NaN / inf in the merged weight raises instead of saving it
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else None
        if parent is None:
            raise ValueError("merge_lora takes a module that contains adapted layers, not one adapted layer")
        setattr(parent, child, layer.get_base_layer())
    if hasattr(module, "peft_config"):  # what inject_adapter_in_model left on the module
        del module.peft_config
    left = adapter_names(module)
    if left:
        raise RuntimeError(f"LoRA parameters left after merging: {left[:5]}")
    return module
