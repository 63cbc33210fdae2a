"""SynthFACS drawing primitives: a pen that draws in face units under the pose, and colours.

Face units: origin between the eyes and the nose, x to the image right, y down, face
half-width ~0.85. The pose (roll, scale, shift, a fake yaw that shifts points by their depth)
is applied in `Pen.px`, so the face-part code in `render.py` never sees pixels.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from expvl.synthesis.synthfacs.sample import FaceParams


def amp(i: float) -> float:
    """Visual strength of an AU at FACS intensity i (0-5): 0 when off, >= 0.44 when on."""
    return 0.0 if i <= 0 else 0.3 + 0.7 * min(i, 5.0) / 5.0


def mix(a, b, t: float) -> tuple[int, int, int]:
    t = min(max(t, 0.0), 1.0)
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def crease_color(skin) -> tuple[int, int, int]:
    """Wrinkle colour: darker than the skin by a margin that stays visible on dark skin."""
    return mix(shade(skin, 0.4), (20, 10, 10), 0.35)


def shade(c, f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v * f))) for v in c)


class Pen:
    """Draws shapes given in face units: pose (roll, scale, shift, fake yaw) applied here."""

    def __init__(self, img: Image.Image, params: FaceParams):
        n = params.nuisance
        side = img.size[0]
        self.draw = ImageDraw.Draw(img)
        self.k = side * 0.335 * n.scale  # pixels per face unit
        self.cx, self.cy = side * (0.5 + n.shift[0]), side * (0.46 + n.shift[1])
        r = math.radians(n.roll)
        self.cos, self.sin = math.cos(r), math.sin(r)
        self.yaw = n.yaw

    def px(self, pts, z: float = 0.3) -> list[tuple[float, float]]:
        """pts (P, 2) face units, z depth (0 outline .. 1 nose tip) -> pixel tuples."""
        p = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        x = p[:, 0] * (1 - 0.06 * abs(self.yaw)) + self.yaw * 0.12 * z
        y = p[:, 1]
        u = self.cx + self.k * (x * self.cos - y * self.sin)
        v = self.cy + self.k * (x * self.sin + y * self.cos)
        return list(zip(u.tolist(), v.tolist()))

    def width(self, w: float) -> int:
        return max(1, round(w * self.k))

    def poly(self, pts, fill, z=0.3):
        self.draw.polygon(self.px(pts, z), fill=fill)

    def line(self, pts, fill, w, z=0.3):
        self.draw.line(self.px(pts, z), fill=fill, width=self.width(w), joint="curve")

    def ellipse(self, c, rx, ry, fill, z=0.3, n=20):
        cos, sin = _circle(n)
        self.poly(np.stack([c[0] + rx * cos, c[1] + ry * sin], 1), fill, z)


@functools.cache
def _circle(n: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.cos(t), np.sin(t)


@functools.cache
def _bezier_weights(n: int) -> np.ndarray:
    t = np.linspace(0, 1, n)
    return np.stack([(1 - t) ** 2, 2 * (1 - t) * t, t ** 2], 1)  # (n, 3)


def bezier(p0, p1, p2, n=9) -> np.ndarray:
    """Quadratic Bezier through p0 and p2 with control p1: (n, 2)."""
    return _bezier_weights(n) @ np.array([p0, p1, p2], dtype=np.float64)
