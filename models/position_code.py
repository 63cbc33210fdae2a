"""The fixed 2-D position code added to image tokens that carry no position of their own.

A CNN tower's feature map flattened into tokens (the embedded default's conv tower) says nothing about
where each token sits; ViT tokens have their own position embedding. Blip2 and VLFAU add this code
after their ln_vision when `image_position` asks for it: "auto" = only for towers without one
(`VisionEncoder.positional` False), "sincos2d" = always, "none" = never. The code is MAE's fixed
2-D sin-cos embedding (He et al. 2022); tests/models/test_vision.py checks its shape, range and choice.
"""

from __future__ import annotations

from typing import Protocol

import torch


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side * side, dim) row-major grid code: a quarter of the channels each for sin/cos of y and x
    at geometric frequencies (the fixed 2-D embedding of MAE, He et al. 2022); values in [-1, 1],
    the scale of the LayerNormed tokens it is added to."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                          indexing="ij")
    ay, ax = y.reshape(-1, 1) * freqs, x.reshape(-1, 1) * freqs  # (N, D/4)
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1).float()  # each pair sin^2+cos^2 = 1


class PositionedTower(Protocol):
    """What the choice reads from an image tower (models/vision.py `VisionEncoder` has both)."""
    positional: bool  # do its tokens carry a position of their own?

    def position_code(self) -> torch.Tensor: ...


IMAGE_POSITION = ("auto", "sincos2d", "none")  # the consumers' `image_position` option (Blip2, VLFAU)


def image_position_code(vision: PositionedTower, mode: str) -> torch.Tensor | None:
    """The (N, D) code a consumer adds to the tokens after its ln_vision, or None.

    "auto": only for towers whose tokens carry no position (`VisionEncoder.positional` False);
    ViT tokens have their own, so BLIP-2 recipes are unchanged. "sincos2d": always; "none": never.
    """
    if mode not in IMAGE_POSITION:
        raise ValueError(f"image_position must be one of {IMAGE_POSITION}, got {mode!r}")
    if mode == "none" or (mode == "auto" and getattr(vision, "positional", True)):  # undeclared: assume it has
        return None
    return vision.position_code()
