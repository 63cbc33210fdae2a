"""EVA ViT-g weights in EVA's own key layout -> the open_clip `EVA01-g-14` image tower.

BLIP-2 and InstructBLIP (LAVIS) build their frozen ViT with `create_eva_vit_g` and fill it from
`eva_vit_g.pth`, in EVA's layout: `cls_token`, `pos_embed`, `patch_embed.proj.*`,
`blocks.{i}.{norm1, attn.qkv.weight, attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2}.*`
(LAVIS `lavis/models/eva_vit.py`). A LAVIS model saved whole, e.g. after fine-tuning the ViT as
Exp-BLIP's second step does, holds the same names under `visual_encoder.`. open_clip's `EVA01-g-14`
wraps timm's `Eva` as `visual.trunk`, whose parameters carry these names unchanged (timm 1.0
`models/eva.py`; its `k_bias` is a zero buffer outside the state dict, as LAVIS's missing k bias), so
the map is the prefix rename; the same arithmetic (pre-norm blocks, exact GELU, LayerNorm eps 1e-6)
is checked against transformers' `Blip2VisionModel`, itself converted from these LAVIS names
(tests/test_eva_weights.py).

Two things the rename does not cover:
- the position embedding of another image size is resized as LAVIS's `interpolate_pos_embed` does
  (bicubic over the patch grid, CLS entry kept; transformers' `interpolate_pos_encoding` is the same);
- keys outside the prefix (a whole LAVIS checkpoint's `Qformer.*`, `ln_vision.*`, LLM) are not the
  encoder's and are left out: they load through `models/convert/lavis.py`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from torch import nn

from models.convert import CheckpointError, read_state_dict

PREFIXES = ("", "visual_encoder.")  # eva_vit_g.pth itself; a whole LAVIS BLIP-2 model
TRUNK = "visual.trunk."             # open_clip TimmModel -> timm Eva


def eva_prefix(state: Mapping[str, torch.Tensor]) -> str | None:
    """The prefix under which `state` holds an EVA-layout ViT, or None when it holds none."""
    for prefix in PREFIXES:
        if f"{prefix}patch_embed.proj.weight" in state and f"{prefix}blocks.0.attn.qkv.weight" in state:
            return prefix
    return None


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid[0]*grid[1], D): bicubic over the square patch grid, CLS kept."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side = round(patches.shape[1] ** 0.5)
    if side * side != patches.shape[1]:
        raise CheckpointError(f"pos_embed of {patches.shape[1]} patch positions is not a square grid")
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos_embed.dtype)
    return torch.cat([cls, patches], dim=1)


def eva_to_open_clip(state: Mapping[str, torch.Tensor], visual: nn.Module, *, prefix: str,
                     what: str) -> dict[str, torch.Tensor]:
    """The EVA-layout entries of `state` (under `prefix`) renamed to open_clip keys for `visual`,
    the position embedding resized to `visual`'s patch grid. Checking the key set is the caller's
    (the loader knows which blocks were pruned)."""
    trunk = getattr(visual, "trunk", None)
    if not isinstance(trunk, Eva):
        raise CheckpointError(f"{what} holds an EVA ViT (LAVIS eva_vit_g.pth layout), which loads only into "
                              f"a timm Eva tower (model_name EVA01-g-14), not {type(visual).__name__}")
    out = {TRUNK + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    pos = out.get(TRUNK + "pos_embed")
    if pos is not None and pos.shape != trunk.pos_embed.shape:
        grid = tuple(trunk.patch_embed.grid_size)
        out[TRUNK + "pos_embed"] = resize_pos_embed(pos, grid)
    return out


def read_eva(path: str, visual: nn.Module) -> dict[str, torch.Tensor] | None:
    """open_clip keys for `visual` from a file in EVA's layout; None for any other file (open_clip's
    own format, which its loader reads)."""
    if path.endswith(".npz"):  # big_vision: open_clip's reader
        return None
    try:
        state = read_state_dict(path)  # memory-mapped
    except CheckpointError:  # not readable as a state dict here: open_clip's loader reports it
        return None
    prefix = eva_prefix(state)
    return None if prefix is None else eva_to_open_clip(state, visual, prefix=prefix, what=path)
