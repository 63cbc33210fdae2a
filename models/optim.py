"""Optimiser and schedule shared by every stage.

The official runner (Exp-BLIP's fork of LAVIS `runner_base.py`) used one AdamW group with weight
decay on biases and LayerNorms, a per-epoch cosine and no layer-wise LR decay although the paper
describes it. We fix these on purpose: no decay for 1-D parameters (norms, biases, temperature)
and embeddings of learned queries, a per-step linear warm-up then cosine to `min_lr`, and optional
layer-wise LR decay for an unfrozen ViT (BEiT/EVA convention: block i of L gets decay ** (L + 1 - i)).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate
    min_lr: float = 1e-5  # floor of the cosine
    warmup_lr: float = 1e-6  # learning rate at step 0 of the warm-up
    warmup_steps: int = 100  # linear warm-up length in optimizer steps
    weight_decay: float = 0.05  # AdamW decay for matrices; 1-D params and query tokens get none
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    vit_layer_decay: float = 1.0  # layer-wise LR decay for an unfrozen image encoder (1 = off)


_NO_DECAY = re.compile(r"(^|\.)(bias|query_tokens|temp)$")
_BLOCK = re.compile(r"\.(?:resblocks|blocks|layers|layer)\.(\d+)\.")


def param_groups(model: nn.Module, cfg: OptimConfig, *, vit_prefix: str = "vision.",
                 vit_depth: int = 0) -> list[dict]:
    """AdamW groups over trainable parameters: (decay | no decay) x (layer-wise LR scale)."""
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not _NO_DECAY.search(name)
        scale = 1.0
        if cfg.vit_layer_decay != 1.0 and name.startswith(vit_prefix) and vit_depth:
            m = _BLOCK.search(name)
            layer = int(m.group(1)) + 1 if m else 0  # stem/pos-embed count as layer 0
            scale = cfg.vit_layer_decay ** (vit_depth + 1 - layer)
        g = groups.setdefault((decay, scale), {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0,
                                               "lr_scale": scale})
        g["params"].append(p)
    return list(groups.values())


def warmup_cosine(step: int, *, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate at optimizer step `step` (per-step, not per-epoch as the official runner)."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / max(1, cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, total_steps: int, vit_depth: int = 0):
    """AdamW plus a LambdaLR implementing `warmup_cosine` (with each group's layer-decay scale)."""
    groups = param_groups(model, cfg, vit_depth=vit_depth)
    if not groups:
        raise ValueError("no trainable parameters: check the stage's freeze table")
    # the per-tensor loop (CPU default): fused / foreach AdamW were slower for the default's stage-1
    # step on CPU (benchmarks/bench_mfu.py times the variants); on GPUs PyTorch picks foreach itself
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    scales = [g["lr_scale"] for g in groups]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [lambda s, k=k: warmup_cosine(s, total_steps=total_steps, cfg=cfg) / cfg.lr * k for k in scales])
    return opt, sched
