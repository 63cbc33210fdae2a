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
(tests/models/test_eva_weights.py).

transformers' `Blip2VisionModel` (the `vision_model.*` of a Blip2 / InstructBlip folder such as
InstructBLIP-Vicuna's) is the same ViT under the names of transformers' conversion script
(`convert_blip_2_original_to_pytorch.py` `create_rename_keys`); `hf_vision_to_eva` reads that table
backwards. Its q and v biases are `self_attn.q_bias` / `v_bias` in files saved by transformers 4 and one
`self_attn.qkv.bias` whose k third is zero in files saved by 5. Its `post_layernorm` is LAVIS's
`ln_vision`, which belongs to the Blip2 composition (training/single_stage.py), not to the encoder.

Two things the renames do not cover:
- the position embedding of another image size is resized as LAVIS's `interpolate_pos_embed` does
  (bicubic over the patch grid, CLS entry kept; transformers' `interpolate_pos_encoding` is the same);
- keys outside the prefix (a whole LAVIS checkpoint's `Qformer.*`, `ln_vision.*`, LLM) are not the
  encoder's and are left out: they load through `models/convert/lavis.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from torch import nn

from expvl.models.convert.weights import CheckpointError, read_weights

PREFIXES = ("", "visual_encoder.")  # eva_vit_g.pth itself; a whole LAVIS BLIP-2 model
TRUNK = "visual.trunk."             # open_clip TimmModel -> timm Eva
HF_PREFIX = "vision_model."         # transformers Blip2 / InstructBlip
HF_LN_VISION = HF_PREFIX + "post_layernorm."  # LAVIS's ln_vision: the composition's, not the encoder's
# the big parts of whole LAVIS / transformers vision-language checkpoints that are never the encoder's: not read
NOT_THE_ENCODER = ("language_model.", "qformer.", "llm_model.", "opt_model.", "Qformer.")

# transformers Blip2VisionModel -> EVA (create_rename_keys read right to left)
_HF_EMBEDDINGS = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
                  "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
                  "embeddings.patch_embedding.bias": "patch_embed.proj.bias"}
_HF_BLOCK = {"layer_norm1.weight": "norm1.weight", "layer_norm1.bias": "norm1.bias",
             "layer_norm2.weight": "norm2.weight", "layer_norm2.bias": "norm2.bias",
             "self_attn.qkv.weight": "attn.qkv.weight", "self_attn.q_bias": "attn.q_bias",
             "self_attn.v_bias": "attn.v_bias", "self_attn.projection.weight": "attn.proj.weight",
             "self_attn.projection.bias": "attn.proj.bias", "mlp.fc1.weight": "mlp.fc1.weight",
             "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.weight": "mlp.fc2.weight",
             "mlp.fc2.bias": "mlp.fc2.bias"}


def hf_vision_to_eva(state: Mapping[str, torch.Tensor], *, what: str) -> dict[str, torch.Tensor]:
    """The `vision_model.*` entries of a transformers Blip2 / InstructBlip state dict in EVA's layout
    (post_layernorm left out). A key the table does not know, or a fused qkv bias with a non-zero k
    third (EVA and timm's Eva have no k bias), is an error naming it."""
    out = {}
    for key, value in state.items():
        if not key.startswith(HF_PREFIX) or key.startswith(HF_LN_VISION):
            continue
        name = key[len(HF_PREFIX):]
        if name in _HF_EMBEDDINGS:
            out[_HF_EMBEDDINGS[name]] = value
            continue
        parts = name.split(".", 3)  # encoder.layers.{i}.<rest>
        if len(parts) == 4 and parts[:2] == ["encoder", "layers"] and parts[2].isdigit():
            block, rest = f"blocks.{parts[2]}.", parts[3]
            if rest in _HF_BLOCK:
                out[block + _HF_BLOCK[rest]] = value
                continue
            if rest == "self_attn.qkv.bias":
                q, k, v = value.chunk(3)
                if not k.is_meta and k.count_nonzero():  # meta: shape checks of full-size names
                    raise CheckpointError(f"{what}: {key} has a non-zero key bias, which EVA ViT-g "
                                          "does not have")
                out[block + "attn.q_bias"], out[block + "attn.v_bias"] = q, v
                continue
        raise CheckpointError(f"{what}: unexpected vision key {key}")
    return out


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
        raise CheckpointError(f"{what} holds an EVA ViT (LAVIS eva_vit_g.pth or transformers Blip2 layout), "
                              "which loads only into "
                              f"a timm Eva tower (model_name EVA01-g-14), not {type(visual).__name__}")
    out = {TRUNK + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    pos = out.get(TRUNK + "pos_embed")
    if pos is not None and pos.shape != trunk.pos_embed.shape:
        grid = tuple(trunk.patch_embed.grid_size)
        out[TRUNK + "pos_embed"] = resize_pos_embed(pos, grid)
    return out


def read_encoder_state(path: str, visual: nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """The weights of an encoder file or of a transformers Blip2 / InstructBlip folder, and whether they
    were in EVA's layout: then already renamed to open_clip keys for `visual`; otherwise as stored (open_clip's
    own layout, which models/vision.py finishes).

    Every file is read here, by `read_weights` (safetensors, or a torch file with `weights_only=True`),
    never by open_clip's loader, which retries a failed weights-only read without the restriction: a file
    that would run code when unpickled is refused, naming it.
    """
    folder = Path(path).is_dir()
    # a folder is a transformers one: its vision_model alone; a file: all but the known big parts
    state = read_weights(path, keep=(lambda k: k.startswith(HF_PREFIX)) if folder
                         else (lambda k: not k.startswith(NOT_THE_ENCODER)))
    if f"{HF_PREFIX}embeddings.patch_embedding.weight" in state:
        state = hf_vision_to_eva(state, what=path)
    elif folder:
        raise CheckpointError(f"{path}: a folder given as the encoder's weights must hold a transformers "
                              f"Blip2 / InstructBlip model ({HF_PREFIX}* keys); it has none")
    prefix = eva_prefix(state)
    if prefix is None:
        return state, False
    return eva_to_open_clip(state, visual, prefix=prefix, what=path), True
