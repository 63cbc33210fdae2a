"""The open_clip tower types VisionEncoder adapts: where each keeps its blocks, and how it is pruned.

One entry per tower class (open_clip's VisionTransformer, ModifiedResNet and TimmModel, which
wraps any timm trunk): `LAYOUTS` says how many blocks `forward_intermediates` indexes and the width
and token count after each; `PRUNERS` removes what reading block `index` never runs (the later
blocks, the final norm, the pooled head), with the libraries' own `prune_intermediate_layers`
where they have one. Checked against open_clip 3.3 and timm 1.0 (`forward_intermediates`,
`prune_intermediate_layers`, `feature_info`); tests/models/test_vision.py runs every tower type.
"""

from __future__ import annotations

from dataclasses import dataclass

from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn


@dataclass
class Layout:
    num_layers: int           # how many blocks `forward_intermediates` indexes
    widths: list[int]         # channels D after each block
    tokens: list[int]         # tokens N after each block (prefix tokens included)
    prefix: int = 0           # CLS-like tokens put before the patch tokens
    positional: bool = True   # tokens carry a position embedding (ViTs); CNN feature maps do not


def _vit_layout(visual: VisionTransformer, image_size: int) -> Layout:
    L, grid = len(visual.transformer.resblocks), visual.grid_size
    return Layout(L, [visual.transformer.width] * L, [grid[0] * grid[1] + 1] * L, prefix=1)


def _resnet_layout(visual: ModifiedResNet, image_size: int) -> Layout:
    # forward_intermediates indexes [stem, layer1, layer2, layer3, layer4]; strides 4, 4, 8, 16, 32
    widths = [visual.conv3.out_channels] + [getattr(visual, f"layer{i}")[-1].conv3.out_channels for i in (1, 2, 3, 4)]
    return Layout(5, widths, [(image_size // s) ** 2 for s in (4, 4, 8, 16, 32)], positional=False)


def _timm_layout(visual: TimmModel, image_size: int) -> Layout:
    info, prefix = visual.trunk.feature_info, getattr(visual.trunk, "num_prefix_tokens", 0)
    return Layout(len(info), [f["num_chs"] for f in info],
                   [(image_size // f["reduction"]) ** 2 + prefix for f in info], prefix=prefix,
                   positional=getattr(visual.trunk, "pos_embed", None) is not None)


LAYOUTS = {VisionTransformer: _vit_layout, ModifiedResNet: _resnet_layout, TimmModel: _timm_layout}


# Pruning to block `index`: VisionEncoder.forward reads that block's output, un-normed, and no pooled head.

def _prune_vit(visual: VisionTransformer, index: int) -> None:
    visual.prune_intermediate_layers([index], prune_norm=True, prune_head=True)
    visual.attn_pool = visual.attn_pool_contrastive = None  # a CoCa-style pooler: open_clip 3.3's prune keeps it


def _prune_resnet(visual: ModifiedResNet, index: int) -> None:
    # open_clip 3.3 has no prune here; as timm's ResNet.prune_intermediate_layers, later stages become
    # identities: forward_intermediates lists all five by name (and, its stop_early inverted, runs them all)
    for i in range(index + 1, 5):
        setattr(visual, f"layer{i}", nn.Identity())
    visual.attnpool = None


def _prune_timm(visual: TimmModel, index: int) -> None:
    visual.trunk.prune_intermediate_layers([index], prune_norm=True, prune_head=True)
    visual.head = nn.Identity()  # open_clip's pooling / projection on top of the trunk; TimmModel has no prune


PRUNERS = {VisionTransformer: _prune_vit, ModifiedResNet: _prune_resnet, TimmModel: _prune_timm}
