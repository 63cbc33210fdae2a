"""Q-Former query-to-image attention maps: where each learned query looks on the face.

The Q-Former's queries read the image only through cross-attention (BLIP-2 §3.1): in a layer that
cross-attends, query q's weights over the N image tokens are softmax(q k^T / sqrt(hd)) per head.
We capture them without touching models/qformer.py: a forward hook on the chosen layer's
`crossattention` module (models.qformer.CrossAttention) records its inputs, the query hidden
states x (B, Q, D) and the image tokens (B, N, E) it was given, and the probabilities are
recomputed from the module's own `self.query` / `self.key` Linears (whichever of its two
equivalent implementations the module ran). tests/evaluation/test_attention_maps.py checks that
these probabilities, applied to the values and passed through the module's output block,
reproduce the module's actual output, i.e. that the maps are the ones the model used.

Token -> pixel layout (models/vision.py): conv towers give N = h*w tokens in row-major order;
ViTs put their prefix (CLS) token(s) first, then the h*w patches row-major. The prefix is
dropped from the maps; the attention mass it took is returned as "prefix_mass".
"""

from __future__ import annotations

import math

import numpy as np
import torch
from einops import rearrange

from expvl.models.qformer import QFormer


def cross_attention_layers(qformer: QFormer) -> list[int]:
    """Indices of the layers that cross-attend to the image (0, freq, 2*freq, ...)."""
    return [i for i, layer in enumerate(qformer.layers) if layer.has_cross_attention]


@torch.no_grad()
def cross_attention(qformer: QFormer, image_embeds: torch.Tensor, *, layer: int | None = None,
                    image_mask: torch.Tensor | None = None, instruction_ids: torch.Tensor | None = None,
                    instruction_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Cross-attention probabilities of every query over the image tokens in one layer.

    Args:
        qformer: a trained Q-Former; it is run in eval mode (dropout off) and its mode restored.
        image_embeds: (B, N, Dv), i.e. after `Blip2.ln_vision` (`Blip2.encode_image` / `embed_features`).
        layer: a layer index that has cross-attention; None = the last such layer.
        image_mask: (B, N) or None, as for `QFormer.encode_queries`.
        instruction_ids, instruction_mask: (B, T) for an instruction-aware (stage-3) Q-Former, whose
            queries see the instruction before they look at the image; None = query-only pass.
    Returns: {"probs": (B, Q, N) mean over heads, "probs_per_head": (B, H, Q, N), "layer": int,
        plus what the module saw and produced, for verification: "query_in" (B, Q, D),
        "kv": the image keys/values it attended to (KV of (B, H, N, hd)), "output" (B, Q, D)}.
    """
    layers = cross_attention_layers(qformer)
    layer = layers[-1] if layer is None else layer
    if layer not in layers:
        raise ValueError(f"Q-Former layer {layer} has no cross-attention; layers with it: {layers}")
    module = qformer.layers[layer].crossattention
    seen: dict = {}

    def hook(mod, args, output):  # CrossAttention.forward(x, image, mask), called positionally by QFormerLayer
        seen["x"], seen["image"], seen["mask"], seen["output"] = args[0], args[1], args[2], output

    was_training = qformer.training
    handle = module.register_forward_hook(hook)
    try:
        qformer.eval()
        if instruction_ids is None:
            qformer.encode_queries(image_embeds, image_mask)
        else:
            qformer.encode_multimodal(instruction_ids, instruction_mask, image_embeds, image_mask)
    finally:
        handle.remove()
        qformer.train(was_training)

    x, kv = seen["x"], module.project_kv(seen["image"])
    q = rearrange(module.self.query(x), "b t (h d) -> b h t d", h=qformer.cfg.num_heads)  # (B, H, Q, hd)
    scores = q.float() @ kv.k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Q, N)
    if seen["mask"] is not None:  # (B, 1, 1, N) bool, True = may attend
        scores = scores.masked_fill(~seen["mask"], float("-inf"))
    probs = scores.softmax(dim=-1)
    return {"probs": probs.mean(dim=1), "probs_per_head": probs, "layer": layer,
            "query_in": x, "kv": kv, "output": seen["output"]}


def tokens_to_grid(probs: torch.Tensor, *, prefix: int, grid_hw: tuple[int, int] | None = None) -> dict:
    """(B, Q, N) attention over tokens -> {"maps": (B, Q, h, w), "prefix_mass": (B, Q)}.

    The first `prefix` tokens (ViT CLS) are dropped; the rest are the h*w grid, row-major.
    grid_hw None = a square grid. Map values stay attention probabilities (they sum to
    1 - prefix_mass per query), so maps of different images are comparable.
    """
    B, Q, N = probs.shape
    n = N - prefix
    if grid_hw is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{N} tokens minus {prefix} prefix = {n} is not a square grid; pass grid_hw")
        grid_hw = (side, side)
    h, w = grid_hw
    if h * w != n:
        raise ValueError(f"grid {h}x{w} = {h * w} tokens, but there are {N} tokens with {prefix} prefix")
    return {"maps": probs[..., prefix:].reshape(B, Q, h, w), "prefix_mass": probs[..., :prefix].sum(-1)}


def query_attention_maps(model, image_embeds: torch.Tensor, grid_hw: tuple[int, int] | None = None, *,
                         layer: int | None = None, instruction_ids: torch.Tensor | None = None,
                         instruction_mask: torch.Tensor | None = None) -> np.ndarray:
    """A Blip2's query-to-image attention as (B, Q, h, w) numpy maps (report.plot_attention entries).

    image_embeds (B, N, Dv) after ln_vision. The prefix token count is read from the vision
    encoder (models.vision.VisionEncoder: 1 CLS for ViTs, 0 for conv towers); with grid_hw given
    and no such encoder, the prefix is whatever precedes the h*w grid.
    """
    probs = cross_attention(model.qformer, image_embeds, layer=layer, instruction_ids=instruction_ids,
                            instruction_mask=instruction_mask)["probs"]
    N = probs.shape[-1]
    prefix = getattr(model.vision, "_prefix", None)  # VisionEncoder keeps it as _prefix (no public name yet)
    if prefix is None:
        if grid_hw is None:
            raise ValueError("the vision encoder does not say how many prefix tokens it has; pass grid_hw")
        prefix = N - grid_hw[0] * grid_hw[1]
    return tokens_to_grid(probs, prefix=prefix, grid_hw=grid_hw)["maps"].cpu().numpy()
