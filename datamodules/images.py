"""Lazy image decoding for the stream: any PNG/JPEG on disk -> an RGB `PIL.Image`, or an `ImageError`.

Images are decoded only when a sample is yielded (after the shuffle buffer), so fast-forwarding
a resumed stream costs no decoding. The transform is the encoder's own preprocessing
(models/vision.py returns it with the model, as open_clip does); this file only calls it.

Mode handling follows what the encoder was trained on: open_clip's `_convert_to_rgb` is a plain
`convert("RGB")`, which drops alpha rather than compositing; we do the same so a face PNG with an
alpha channel gives the pixels the encoder would see elsewhere. Palette images go through RGBA
first (Pillow warns on palette transparency otherwise), 16-bit grayscale is scaled to 8 bits
(`convert` would clip it to white), and EXIF orientation is applied (phone JPEGs are often
stored sideways).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(OSError):
    """An image that is missing or cannot be decoded; `path` names it.

    `reason` may be omitted because a DataLoader worker re-raises an exception in the main process
    as `type(e)(message)`: the type survives and the message still names the path.
    """

    def __init__(self, path: str | Path, reason: str | None = None):
        self.path = str(path)
        self.reason = reason
        super().__init__(self.path if reason is None else f"{self.path}: {reason}")


def resolve_image(image: str, root: Path) -> Path:
    """A record's image path: absolute as given, else relative to the dataset root."""
    p = Path(image)
    return p if p.is_absolute() else root / p


def load_image(path: str | Path) -> Image.Image:
    """Decodes an image fully (truncated files fail here, not later in the transform) to RGB."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "no such file")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # Pillow reports corrupt data as OSError ("image file is truncated"), SyntaxError (bad PNG
        # chunk) or ValueError (bad header fields) depending on the codec.
        raise ImageError(path, f"cannot decode image ({type(e).__name__}: {e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB (16-bit grey scaled down, not clipped; alpha dropped)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.int64)
        if a.max(initial=0) > 255:  # 16-bit data: keep the full range instead of clipping to 255
            a = a // 257
        img = Image.fromarray(a.clip(0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")  # L, LA, RGBA, CMYK, YCbCr, ... (alpha dropped, see module docstring)


def load_transformed(path: str | Path, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """`transform(load_image(path))`, checked to be a tensor so a wrong transform fails with its path."""
    out = transform(load_image(path))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{path}: the image transform must return a torch.Tensor, got {type(out).__name__}")
    return out


def random_resized_crop(images: torch.Tensor, *, scale: tuple[float, float] = (0.9, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), mode: str = "bicubic",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision's RandomResizedCrop for a whole batch at once: (B, C, H, W) -> (B, C, H, W).

    Per image: area fraction ~ U(scale), aspect ~ log-U(ratio) (sides clipped to the image), a
    uniform position, resampled to the input size by one `grid_sample` (`mode`: bicubic, as open_clip's
    transform; bilinear blurs the 64 px faces, and the default encoder's AU probe reads them worse).
    Used on already-decoded, already-normalised images (StageDataModule `cache_images` + `augment`):
    decoding plus open_clip's per-image PIL transform cost nearly as much as a step of the default
    encoder bootstrap.
    """
    B = images.shape[0]
    rand = torch.rand(B, 4, generator=generator).to(images.device)
    area = scale[0] + (scale[1] - scale[0]) * rand[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand[:, 1]
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)  # crop sides as fractions of the image
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * rand[:, 2] - 1)  # crop centre in [-1, 1] grid units, crop kept inside
    cy = (1 - h) * (2 * rand[:, 3] - 1)
    theta = torch.zeros(B, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)
