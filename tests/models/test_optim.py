"""Optimizer groups and the per-step schedule."""

import pytest
import torch
from torch import nn

from expvl.models.optim import OptimConfig, build_optimizer, param_groups, warmup_cosine


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, 4, 8))
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.vision = nn.Module()
        self.vision.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))


def test_no_decay_groups_and_frozen_excluded():
    groups = param_groups(Toy(), OptimConfig(weight_decay=0.1))
    by_wd = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in groups}
    # decayed: proj.weight (64) + 3 vision weights (192); not: biases, norm, query tokens
    assert by_wd[0.1] == 64 + 192
    assert by_wd[0.0] == 32 + 8 + 16 + 24
    ids = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) not in ids for p in Toy().frozen.parameters())


def test_layer_decay_scales_deeper_blocks_less():
    groups = param_groups(Toy(), OptimConfig(vit_layer_decay=0.5), vit_depth=3)
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == [0.125, 0.25, 0.5, 1.0]  # blocks 0, 1, 2 then non-ViT


def test_schedule_warms_up_then_decays_to_min():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_lr=0.0, warmup_steps=10)
    assert warmup_cosine(0, total_steps=100, cfg=cfg) == 0.0
    assert warmup_cosine(5, total_steps=100, cfg=cfg) == pytest.approx(5e-4)
    assert warmup_cosine(10, total_steps=100, cfg=cfg) == pytest.approx(1e-3)
    assert warmup_cosine(100, total_steps=100, cfg=cfg) == pytest.approx(1e-5)
    lrs = [warmup_cosine(s, total_steps=100, cfg=cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_build_optimizer_applies_schedule_and_refuses_empty():
    m = Toy()
    opt, sched = build_optimizer(m, OptimConfig(lr=1e-3, warmup_steps=2, warmup_lr=0.0), total_steps=10)
    assert opt.param_groups[0]["lr"] == 0.0
    opt.step(); sched.step(); opt.step(); sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), OptimConfig(), total_steps=10)


def test_layer_decay_counts_the_blocks_the_encoder_keeps_as_lavis_does():
    """LAVIS builds EVA ViT-g with 39 of its 40 blocks and scales block i by decay ** (39 - i): the top
    kept block gets one factor. Our encoder reads block -2 of the full tower and prunes the last."""
    from expvl.models.vision import VisionConfig, VisionEncoder

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = VisionEncoder(VisionConfig.from_name("tiny-vit", layer=-2, freeze=False))

    model = Wrap()
    depth = model.vision.num_layers
    blocks = model.vision.visual.transformer.resblocks
    assert depth == len(blocks) == model.vision.layer_index + 1
    groups = param_groups(model, OptimConfig(vit_layer_decay=0.5), vit_depth=depth)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(blocks[-1].mlp.c_fc.weight)] == 0.5 and scale[id(blocks[0].mlp.c_fc.weight)] == 0.5 ** depth
