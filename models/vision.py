"""Image encoder: an adapter over open_clip that returns patch tokens from a chosen block.

BLIP-2 (Li et al. 2023, §3.1) feeds the Q-Former with the *penultimate* block's token sequence of a
frozen EVA ViT-g/14 (257 x 1408 at 224 px, CLS included, no final norm); Exp-BLIP and Exp-VQA keep
that encoder. Checked against LAVIS `eva_vit.py` / `blip2.py` (layer choice, freezing, fp16 recipe)
and `blip_processors.py` (preprocessing), and against open_clip 3.3 (`factory.create_model`,
`VisionTransformer.forward_intermediates`, `ModifiedResNet`, `TimmModel`).

Any open_clip architecture works: a registered name ("ViT-B-16", "EVA01-g-14" through timm) or a
custom dict in open_clip's model-config format (tiny CPU towers). Weights come only from a local
file: a tag that open_clip would download raises, telling the user to fetch the file and pass its
path (nothing is downloaded at run time in this project). Files in open_clip's format load as open_clip
would load them, but are read weights-only here (a file that would run code is refused); LAVIS's
`eva_vit_g.pth` (EVA's own layout) and a transformers Blip2 / InstructBlip folder's `vision_model`
through models/convert/eva.py.

Tokens are read with the towers' own `forward_intermediates(indices=[layer], intermediates_only=True)`,
and nothing is monkey-patched. What that call never runs (the blocks after `layer`, the final norm,
the pooled head) is pruned from the tower before the weights load, with the libraries'
`prune_intermediate_layers` (timm's ResNet recipe for ModifiedResNet, which has none): an idle
trainable parameter breaks DDP (find_unused_parameters=False) and an idle frozen one is dead memory.
Weight files may hold the pruned parts (a full CLIP file) or not (our own saved tower); every kept
key must be there. `build_clip` returns the full open_clip model (image + text towers), for pretraining
a tower CLIP-style with open_clip's `ClipLoss`; `VisionEncoder.from_clip` then takes its image tower.
(The embedded default's stand-in encoder is trained on labels instead: training/bootstrap.py `step_encoder`.)

Why the "tiny-conv" preset is a CNN: a plain patch-16 ViT at 64 px (16 patches, no locality prior)
did not learn in a CPU-sized budget of CLIP training, a conv tower does. open_clip's ModifiedResNet is
configured by the same dict format (vision_cfg.layers as a list), and its stage outputs are plain
feature maps that flatten row-major into tokens. We read stage 3 (stride 16: 4 x 4 = 16 tokens of
16 * `width` channels at 64 px) rather than stage 4 (2 x 2 = 4 tokens): BLIP-2's "penultimate"
choice, and 16 regions give the Q-Former's queries something spatial to attend to (brows, eyes,
mouth). Width 16 rather than 32: under supervised AU training the narrower tower makes the same
progress per step at a fraction of the cost per step. (Under that supervised loss "tiny-vit" also
learns; the ViT's failure is a CLIP-loss one.)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.convert import load_big_vision_weights
from open_clip.timm_model import TimmModel
from torch import nn
from torchvision import transforms as T

from expvl.models.convert.eva import read_encoder_state
from expvl.models.convert.weights import CheckpointError
from expvl.models.position_code import sincos_2d
from expvl.models.vision_towers import LAYOUTS, PRUNERS

_TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2}

# Literal presets; `VisionConfig.from_name(name)` copies one. Real weights are never bundled:
# give `pretrained=/path/to/file` for eva-g / vit-b-16.
PRESETS: dict[str, dict[str, Any]] = {
    # BLIP-2 / Exp-BLIP / Exp-VQA: EVA ViT-g/14 (40 blocks, 1408 wide), penultimate block, fp16 frozen.
    "eva-g": {"model_name": "EVA01-g-14", "image_size": 224, "layer": -2, "freeze": True, "precision": "fp16",
              "transform": "blip2"},
    # A common open_clip ViT-B/16 (12 blocks, 768 wide).
    "vit-b-16": {"model_name": "ViT-B-16", "image_size": 224, "layer": -2, "freeze": True, "precision": "fp32"},
    # Plain patch ViT for unit tests: 2 blocks, 64 wide, 4 x 4 patches + CLS at 64 px.
    "tiny-vit": {"custom": {"embed_dim": 64,
                            "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                                           "head_width": 32},
                            "text_cfg": {**_TINY_TEXT, "width": 64, "heads": 2}},
                 "image_size": 64, "layer": -2, "freeze": True, "precision": "fp32"},
    # Conv tower (open_clip ModifiedResNet, ~1.4M params) that learns on CPU at 64 px;
    # layer -2 = stage 3 output: 16 tokens x 256 channels (see the module docstring).
    "tiny-conv": {"custom": {"embed_dim": 128,
                             "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16,
                                            "head_width": 64},
                             "text_cfg": {**_TINY_TEXT}},
                  "image_size": 64, "layer": -2, "freeze": True, "precision": "fp32"},
}

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP-2's processors (LAVIS blip_processors.py)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LOW_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class VisionConfig:
    model_name: str = ""                  # open_clip architecture name (open_clip.list_models()); "" = use `custom`
    custom: dict[str, Any] | None = None  # open_clip model-config dict {embed_dim, vision_cfg, text_cfg[, custom_text]}
    pretrained: str = ""                  # local weights file (open_clip CLIP state dict, or ours: "visual.*" keys),
                                          # or an open_clip tag already in the local cache; "" = random init
    image_size: int = 224                 # input side in pixels; overrides the architecture's default
    layer: int = -2                       # block whose output is returned (python indexing); -2 = BLIP-2's penultimate
    freeze: bool = True                   # no gradients and always in eval mode (BLIP-2 freeze_vit)
    precision: str = "fp32"               # "fp32" | "fp16" | "bf16"; low precision only for a frozen tower
    grad_checkpointing: bool = False      # recompute blocks in backward (ViT towers; a no-op for ModifiedResNet)
    transform: str = "open_clip"          # "open_clip" (the model's own preprocessing) | "blip2" (LAVIS's)

    def __post_init__(self):
        if bool(self.model_name) == (self.custom is not None):
            raise ValueError("VisionConfig: give exactly one of model_name (an open_clip name) or custom "
                             f"(an open_clip config dict); got model_name={self.model_name!r}, "
                             f"custom={'set' if self.custom is not None else None}")
        if self.precision not in ("fp32", *_LOW_PRECISION):
            raise ValueError(f"VisionConfig.precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.precision != "fp32" and not self.freeze:
            raise ValueError(f"VisionConfig.precision={self.precision!r} needs freeze=True: a trained tower keeps "
                             "fp32 weights and runs under autocast (as BLIP-2 does when fine-tuning the ViT)")
        if self.transform not in ("open_clip", "blip2"):
            raise ValueError(f"VisionConfig.transform must be 'open_clip' or 'blip2', got {self.transform!r}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> VisionConfig:
        if name not in PRESETS:
            raise KeyError(f"unknown vision preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})


# ---------------------------------------------------------------------------------------------- weights

def resolve_pretrained(model_name: str, pretrained: str) -> str | None:
    """Turn `pretrained` into a local file path, or None for random init. Never touches the network."""
    if not pretrained:
        return None
    if os.path.isfile(pretrained) or os.path.isfile(os.path.join(pretrained, "config.json")):
        return pretrained  # a file, or a transformers Blip2 / InstructBlip folder (models/convert/eva.py)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if model_name else {}
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name) if model_name else []
        raise FileNotFoundError(f"pretrained={pretrained!r}: no such file"
                                + (f", and not an open_clip tag of {model_name} (tags: {tags})" if model_name else ""))
    cached = _cached_tag_file(tag_cfg)
    if cached:
        return cached
    source = tag_cfg.get("hf_hub") or tag_cfg.get("url") or "its hub"
    raise FileNotFoundError(
        f"pretrained tag {pretrained!r} of {model_name} is not in the local cache and would be downloaded from "
        f"{source}; this project never downloads weights at run time. Fetch the file yourself and pass its "
        f"local path: pretrained=/path/to/open_clip_model.safetensors")


def _cached_tag_file(tag_cfg: dict) -> str | None:
    """The file open_clip would download for a tag, if an earlier download left it in a local cache."""
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache  # a pure file-system lookup
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin") if not filename else (filename,):
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return hit
    if tag_cfg.get("url"):
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(tag_cfg["url"]))
        if os.path.isfile(path):
            return path
    return None


def _load_weights(clip: nn.Module, path: str, *, need_text: bool, pruned: frozenset[str] = frozenset()) -> None:
    """Strictly load an open_clip-format file; a visual-only file ("visual.*" keys) is fine unless need_text.

    A file in EVA's own layout (LAVIS `eva_vit_g.pth`, or a whole LAVIS model's `visual_encoder.*`), or a
    transformers Blip2 / InstructBlip file or folder, loads into an EVA01-g-14 tower through
    models/convert/eva.py. `pruned`: keys of parts removed from `clip`
    (see `VisionEncoder`); the file may hold them or not. Torch files are read weights-only
    (`read_encoder_state`); big_vision's `.npz` arrays through open_clip (numpy, which refuses pickles).
    """
    try:
        if path.endswith(".npz"):
            load_big_vision_weights(clip, path)
            return
        state, eva = read_encoder_state(path, clip.visual)
        incompatible = clip.load_state_dict(state if eva else _open_clip_layout(clip, state), strict=False)
    except CheckpointError:
        raise
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"cannot load {path} into the open_clip model: {e}") from None
    except Exception as e:  # noqa: BLE001 -- numpy / open_clip raise many types on a corrupt file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    missing = [k for k in incompatible.missing_keys if need_text or k.startswith("visual.")]
    unexpected = [k for k in incompatible.unexpected_keys if k not in pruned]
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]} "
                              "for this architecture")


def _open_clip_layout(clip: nn.Module, state: dict) -> dict:
    """A state dict in open_clip's layout as open_clip's own loader (open_clip 3.3 `factory.load_checkpoint`)
    prepares it: the weights of a training checkpoint, DDP's "module." prefix off, other projects' layouts
    converted, scalar logit parameters reshaped, position embeddings resized to this model. That loader is
    not called because it reads the file itself (see `_load_weights`)."""
    if isinstance(state.get("state_dict"), dict):  # open_clip's training checkpoints: {"epoch", "state_dict", ...}
        state = state["state_dict"]
    if state and next(iter(state)).startswith("module"):
        state = {k[len("module."):]: v for k, v in state.items()}
    state = open_clip.factory.convert_state_dict(clip, state)
    if "positional_embedding" in state and not hasattr(clip, "positional_embedding"):
        state = open_clip.model.convert_to_custom_text_state_dict(state)
    for name in ("logit_scale", "logit_bias"):
        ours = getattr(clip, name, None)
        if name in state and ours is not None and ours.ndim != state[name].ndim:
            state[name] = state[name].reshape(ours.shape)
    if "logit_bias" not in state and getattr(clip, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    position_ids = "text.transformer.embeddings.position_ids"  # transformers text towers dropped this buffer
    if position_ids in state and not hasattr(clip, position_ids):
        del state[position_ids]
    open_clip.model.resize_pos_embed(state, clip)
    open_clip.model.resize_text_pos_embed(state, clip)
    return state


def build_clip(config: VisionConfig, *, device: str | torch.device = "cpu", need_text: bool = True) -> nn.Module:
    """The full fp32 open_clip model (image + text towers) described by `config`, weights loaded.

    `device="meta"` builds the structure only (no memory, no init cost): shape checks of real sizes.
    """
    path = resolve_pretrained(config.model_name, config.pretrained)  # fail before any costly build
    clip = _create_clip(config, device)
    if path is not None:
        _load_weights(clip, path, need_text=need_text)
    return clip


def _create_clip(config: VisionConfig, device: str | torch.device) -> nn.Module:
    """The open_clip model with random weights and the preprocessing of its weights' source."""
    with torch.device(device):
        if config.model_name:  # pretrained_image/text=False: timm / HF towers must not fetch weights either
            clip = open_clip.create_model(config.model_name, pretrained=None, device=device,
                                          force_image_size=config.image_size,
                                          pretrained_image=False, pretrained_text=False)
        else:
            cfg = copy.deepcopy(dict(config.custom))
            cfg["vision_cfg"] = dict(cfg["vision_cfg"], image_size=config.image_size)
            if "timm_model_name" in cfg["vision_cfg"]:
                cfg["vision_cfg"]["timm_model_pretrained"] = False
            clip_class = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
            clip = clip_class(**cfg)
            if isinstance(clip.visual, TimmModel):
                clip.visual.set_input_size(config.image_size)
    if config.model_name and config.pretrained and not os.path.isfile(config.pretrained):  # a cached tag
        # (resolve_pretrained found it): its own mean/std
        tag_cfg = open_clip.get_pretrained_cfg(config.model_name, config.pretrained)
        pp = open_clip.get_model_preprocess_cfg(clip)
        open_clip.set_model_preprocess_cfg(clip, {**pp, **{k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg}})
    return clip


def clip_tokenizer(config: VisionConfig):
    """open_clip's text tokenizer for `build_clip(config)`'s text tower: texts -> LongTensor (B, context_length)."""
    if config.model_name:
        return open_clip.get_tokenizer(config.model_name)
    return open_clip.SimpleTokenizer(context_length=config.custom["text_cfg"].get("context_length", 77))


# ---------------------------------------------------------------------------------------------- encoder

class VisionEncoder(nn.Module):
    """images (B, 3, S, S) -> tokens (B, N, D) from block `config.layer` of an open_clip image tower,
    pruned to the parts that produce them."""

    def __init__(self, config: VisionConfig, *, device: str | torch.device = "cpu",
                 clip_model: nn.Module | None = None):
        super().__init__()
        self.config = config
        path = None
        if clip_model is None:
            path = resolve_pretrained(config.model_name, config.pretrained)  # fail before any costly build
            clip_model = _create_clip(config, device)
        elif isinstance(clip_model, VisionEncoder):  # its tower is pruned: the layout would count the wrong blocks
            raise TypeError("VisionEncoder takes an open_clip model (build_clip), not another VisionEncoder")
        self.visual = clip_model.visual  # named as in open_clip state dicts: "visual.*" keys load both ways
        layout_fn = LAYOUTS.get(type(self.visual))
        if layout_fn is None:
            raise TypeError(f"unsupported open_clip image tower {type(self.visual).__name__}; "
                            f"supported: {[c.__name__ for c in LAYOUTS]}")
        layout = layout_fn(self.visual, config.image_size)
        if not -layout.num_layers <= config.layer < layout.num_layers:
            raise ValueError(f"VisionConfig.layer={config.layer} out of range for a tower with "
                             f"{layout.num_layers} blocks")
        self.layer_index = config.layer % layout.num_layers          # non-negative block index
        # blocks the pruned tower keeps: layer-wise LR decay counts these, as LAVIS's EVA (depth 39 of 40)
        self.num_layers = self.layer_index + 1
        self.width = layout.widths[self.layer_index]                 # D
        self.num_tokens = layout.tokens[self.layer_index]            # N
        self._prefix = layout.prefix
        self.positional = layout.positional                          # tokens know where they are
        self.image_size = config.image_size

        full = set(clip_model.state_dict())  # prune, then load: the file must hold every kept key (see header)
        PRUNERS[type(self.visual)](self.visual, self.layer_index)
        if path is not None:
            _load_weights(clip_model, path, need_text=False, pruned=frozenset(full - set(clip_model.state_dict())))

        pp = open_clip.get_model_preprocess_cfg(clip_model)
        self.mean, self.std = tuple(pp.get("mean", _CLIP_MEAN)), tuple(pp.get("std", _CLIP_STD))
        self.train_transform = self._transform(is_train=True, pp=pp)
        self.eval_transform = self._transform(is_train=False, pp=pp)

        if config.grad_checkpointing:
            self.visual.set_grad_checkpointing(True)
        self.dtype = _LOW_PRECISION.get(config.precision, torch.float32)
        if config.freeze:
            self.visual.requires_grad_(False)
            self.visual.eval()
        if config.precision != "fp32":
            if isinstance(self.visual, TimmModel):  # as open_clip's factory: timm towers cast whole
                self.visual.to(self.dtype)
            else:  # BLIP-2 / OpenAI recipe: conv and linear weights low precision, norms stay fp32
                open_clip.convert_weights_to_lp(self.visual, self.dtype)

    @classmethod
    def from_clip(cls, config: VisionConfig, clip_model: nn.Module) -> VisionEncoder:
        """Take (a copy of) the image tower of a trained `build_clip(config)` model; config.pretrained is not read."""
        return cls(config, clip_model=copy.deepcopy(clip_model))

    def position_code(self) -> torch.Tensor:
        """(N, D) fixed 2-D sin-cos code of each token's grid cell; zero rows for prefix tokens.

        For towers whose tokens carry no position (`positional` False: CNN feature maps). The
        Q-Former's cross-attention keys are otherwise content-only, so its queries cannot ask
        "what is at the brows": on the default, a linear probe reads AUs far better from the
        flattened (position-aware) tokens than from their mean.
        """
        side = math.isqrt(self.num_tokens - self._prefix)
        if side * side != self.num_tokens - self._prefix or self.width % 4:
            raise ValueError(f"no 2-D position code for {self.num_tokens - self._prefix} grid tokens of width "
                             f"{self.width} (needs a square grid and a width divisible by 4)")
        return F.pad(sincos_2d(side, self.width), (0, 0, self._prefix, 0))

    def train(self, mode: bool = True) -> VisionEncoder:
        super().train(mode)
        if self.config.freeze:  # a frozen tower keeps eval behaviour (dropout off, BatchNorm running stats)
            self.visual.eval()
        return self

    def _check(self, images: torch.Tensor) -> None:
        want = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"VisionEncoder expects images of shape (B, {', '.join(map(str, want))}), "
                             f"got {tuple(images.shape)}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S), normalised -> tokens (B, N, D), prefix (CLS) tokens first."""
        self._check(images)
        out = self.visual.forward_intermediates(
            images.to(self.dtype), indices=[self.layer_index], stop_early=True, intermediates_only=True,
            output_fmt="NCHW", output_extra_tokens=self._prefix > 0)
        grid = out["image_intermediates"][0]                     # (B, D, h, w)
        tokens = grid.flatten(2).transpose(1, 2)                 # (B, h*w, D), row-major like the ViT sequence
        if self._prefix:
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)  # (B, P + h*w, D)
        return tokens

    def _transform(self, *, is_train: bool, pp: dict):
        S = self.image_size
        if self.config.transform == "blip2":  # LAVIS blip_image_*, minus RandAugment (papers: crop + flip)
            norm = T.Normalize(_CLIP_MEAN, _CLIP_STD)
            if is_train:
                return T.Compose([T.RandomResizedCrop(S, scale=(0.8, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                                  T.RandomHorizontalFlip(), T.ToTensor(), norm])
            return T.Compose([T.Resize((S, S), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), norm])
        cfg = open_clip.transform.PreprocessCfg(**{**{k: v for k, v in pp.items()
                                                      if k in _PREPROCESS_FIELDS}, "size": S})
        return open_clip.transform.image_transform_v2(cfg, is_train=is_train)


_PREPROCESS_FIELDS = {f.name for f in dataclasses.fields(open_clip.transform.PreprocessCfg)}
