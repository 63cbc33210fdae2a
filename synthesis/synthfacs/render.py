"""SynthFACS drawing: one frontal face from `FaceParams`, with PIL and numpy only.

Geometry lives in "face units": origin between the eyes and the nose, x to the image right,
y down, face half-width ~0.85. Each AU moves or adds the cue FACS describes for it (checked
against the FACS manual's appearance changes, as commonly cited):

  AU1 inner brows up + central forehead wrinkles   AU2 outer brows up + lateral wrinkles
  AU4 brows down and together + vertical furrows   AU5 upper lid up (white above the iris)
  AU6 cheek crease under the eye + crow's feet     AU7 lower lid up and straight
  AU9 nose wrinkles, nostrils up, nasolabial       AU10 upper lip up (upper teeth if apart)
  AU12 lip corners up and out                      AU14 dimples beside tucked corners
  AU15 lip corners down + corner creases           AU16 lower lip down (lower teeth)
  AU17 chin boss wrinkles, lower lip pushed up     AU20 lips stretched sideways
  AU23 lips narrowed and thinned                   AU24 lips pressed thin, bulges around
  AU25 lips apart (dark gap, upper teeth)          AU26 jaw drop (chin lower, wide opening)
  AU43 eyes closed

Bilateral AUs act per side with their own intensity (contempt is one-sided). The face is drawn
at size * supersample and box-downsampled; lighting, blur and noise are applied at output size.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from expvl.synthesis.synthfacs.pen import Pen, amp, bezier, crease_color, mix, shade
from expvl.synthesis.synthfacs.sample import FaceParams

EYE_Y, NOSE_Y, MOUTH_Y = -0.12, 0.30, 0.60
SCLERA, PUPIL, TEETH, MOUTH_INSIDE = (236, 234, 228), (15, 12, 12), (240, 238, 226), (70, 22, 28)


class Face:
    """Per-side AU strengths and derived landmark positions of one face."""

    def __init__(self, params: FaceParams):
        self.p = params
        self.id = params.identity
        sides = params.expression.sides
        self.a = {au: (amp(l), amp(r)) for au, (l, r) in sides.items()}

    def s(self, au: str, side: int) -> float:
        return self.a.get(au, (0.0, 0.0))[side]

    def m(self, au: str) -> float:  # midline AUs use the mean of both sides
        l, r = self.a.get(au, (0.0, 0.0))
        return (l + r) / 2

    @property
    def jaw_drop(self) -> float:
        return 0.20 * self.m("AU26")


def draw_background(img: Image.Image, params: FaceParams) -> None:
    n = params.nuisance
    rng = np.random.default_rng(n.bg_seed)
    d = ImageDraw.Draw(img)
    side = img.size[0]
    base = tuple(int(v) for v in rng.integers(20, 235, 3))
    d.rectangle([0, 0, side, side], fill=base)
    if n.background == 1:
        other = tuple(int(v) for v in rng.integers(20, 235, 3))
        for i in range(0, side, 4):
            d.rectangle([0, i, side, i + 4], fill=mix(base, other, i / side))
    elif n.background == 2:
        for _ in range(int(rng.integers(6, 14))):
            col = tuple(int(v) for v in rng.integers(0, 256, 3))
            x0, y0 = rng.uniform(-0.2, 1.0, 2) * side
            w, h = rng.uniform(0.05, 0.5, 2) * side
            kind = rng.integers(3)
            if kind == 0:
                d.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
            elif kind == 1:
                d.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
            else:
                d.line([x0, y0, x0 + w, y0 + h], fill=col, width=int(rng.integers(2, 8)))


def draw_head(pen: Pen, f: Face) -> None:
    """Hair behind, neck, shirt, ears, face outline (with the jaw drop), hair on top."""
    idn = f.id
    hair, skin = idn.hair, idn.skin
    if idn.hair_style == 2:  # long hair falls behind the face
        pen.poly([(-idn.face_w * 1.22, -0.6), (-idn.face_w * 1.35, 1.5), (idn.face_w * 1.35, 1.5),
                  (idn.face_w * 1.22, -0.6)], hair, z=0)
    pen.poly([(-0.33, 0.6), (-0.36, 2.0), (0.36, 2.0), (0.33, 0.6)], shade(skin, 0.85), z=0)
    pen.poly([(-1.7, 2.6), (-1.5, 1.45), (-0.3, 1.3), (0.3, 1.3), (1.5, 1.45), (1.7, 2.6)],
             idn.shirt, z=0)
    for sx in (-1, 1):
        pen.ellipse((sx * idn.face_w * 0.98, -0.02), 0.09, 0.17, shade(skin, 0.92), z=0)
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x, y = idn.face_w * np.cos(t), idn.face_h * np.sin(t)
    low = np.clip(np.sin(t), 0, None)
    x = x * (1 - (1 - idn.jaw) * 0.28 * low ** 2)  # narrower jaw for low `jaw`
    y = y + f.jaw_drop * np.clip((y - 0.2) / 0.8, 0, 1)  # the chin follows the dropped jaw
    pen.poly(np.stack([x, y], 1), skin, z=0)
    if idn.hair_style == 0:
        return
    top = -idn.face_h * 1.04
    w = idn.face_w * 1.04
    part = 0.12 if idn.hair_style == 3 else 0.0
    cap = [(-w, -0.35), (-w * 0.95, -0.75), (-w * 0.6, top * 0.98), (0, top * 1.04), (w * 0.6, top * 0.98),
           (w * 0.95, -0.75), (w, -0.35), (w * 0.82, -0.5), (w * 0.55, -0.72 + part), (0, -0.80 + part),
           (-w * 0.55, -0.76 - part), (-w * 0.82, -0.5)]
    pen.poly(cap, hair, z=0)
    if idn.hair_style == 4:
        pen.ellipse((0, top * 1.1), 0.28, 0.2, hair, z=0)


def draw_eye(pen: Pen, f: Face, side: int) -> None:
    idn = f.id
    sx = -1 if side == 0 else 1
    ex, ey, ew, eh = sx * idn.eye_dx, EYE_Y + 0.03 * f.s("AU9", side), idn.eye_w, idn.eye_h
    a5, a6, a7, a43 = (f.s(au, side) for au in ("AU5", "AU6", "AU7", "AU43"))
    up = eh * (1 + 1.3 * a5 - 0.5 * a7 - 0.3 * a6 - 0.2 * f.s("AU4", side))
    lo = eh * (0.8 - 0.7 * a7 - 0.45 * a6)
    closed = min(1.0, a43 / 0.75)  # intensity >= ~2 shuts the eye fully
    up = up * (1 - closed) - lo * 0.6 * closed
    xs = np.linspace(-ew, ew, 11)
    bulge = np.cos(xs / ew * np.pi / 2)
    upper = np.stack([ex + xs, ey - up * bulge ** 0.7], 1)
    flat = 1 - 0.6 * a7  # AU7 straightens the lower lid
    lower = np.stack([ex + xs, ey + lo * bulge ** (0.7 * flat + 0.3)], 1)
    skin = idn.skin
    r = eh * 1.15
    top = ey - max(up, r) - 0.02
    bottom = ey + max(lo, r) + 0.02
    if closed < 1.0:
        pen.poly(np.concatenate([upper, lower[::-1]]), SCLERA)
        pen.ellipse((ex, ey + 0.1 * eh), r, r, idn.iris)
        pen.ellipse((ex, ey + 0.1 * eh), r * 0.45, r * 0.45, PUPIL)
        # lids: skin covers the iris outside the aperture
        pen.poly(np.concatenate([upper, [(ex + ew, top), (ex - ew, top)]]), skin)
        pen.poly(np.concatenate([lower, [(ex + ew, bottom), (ex - ew, bottom)]]), skin)
    lid = shade(skin, 0.35)
    pen.line(upper, lid, 0.028)
    pen.line(lower, mix(skin, lid, 0.5 + 0.5 * a7), 0.014 + 0.02 * a7)
    if a7 > 0:  # the tensed lower lid bulges just under its margin
        pen.line(lower[2:-2] + (0, 0.04), mix(skin, crease_color(skin), a7), 0.024)
    if a43 == 0 and a5 == 0:  # the upper-lid crease; AU5 hides it by lifting the lid
        pen.line(upper[2:-2] + (0, -0.035), shade(skin, 0.8), 0.012)
    if a6 > 0:  # cheek raiser: infraorbital crease, crow's feet, cheek highlight
        crease = mix(skin, crease_color(skin), a6)
        pen.line(bezier((ex - ew * 0.9, ey + lo + 0.05), (ex, ey + lo + 0.13), (ex + ew * 0.9, ey + lo + 0.05)),
                 crease, 0.022)
        ox = ex + sx * ew * 1.08
        for ang in (-0.45, 0.0, 0.45):
            pen.line([(ox, ey), (ox + sx * 0.11 * math.cos(ang), ey + 0.11 * math.sin(ang))], crease, 0.02)
        pen.ellipse((sx * (idn.eye_dx + 0.04), ey + 0.3), 0.13, 0.07, shade(skin, 1 + 0.12 * a6))


def draw_brow(pen: Pen, f: Face, side: int) -> None:
    idn = f.id
    sx = -1 if side == 0 else 1
    a1, a2, a4, a9 = (f.s(au, side) for au in ("AU1", "AU2", "AU4", "AU9"))
    u = np.linspace(0, 1, 7)
    x_in, x_out = sx * (0.09 - 0.045 * a4), sx * (idn.eye_dx + idn.eye_w + 0.09)
    base = EYE_Y - idn.brow_h
    y = (base - 0.035 * np.sin(np.pi * (0.2 + 0.7 * u))
         - 0.17 * a1 * (1 - u) ** 1.4 - 0.15 * a2 * u ** 1.1
         + 0.09 * a4 * (1 - 0.5 * u) + 0.035 * a9 * (1 - u))
    pts = np.stack([x_in + (x_out - x_in) * u, y], 1)
    pen.line(pts, idn.hair, idn.brow_w)
    pen.line(pts[:-2] + (0, -0.012), idn.hair, idn.brow_w * 0.8)
    skin = idn.skin
    dark = crease_color(skin)
    if a1 > 0:  # central forehead wrinkles, bowed upward like the raised inner brows
        for k in range(3):
            yy = base - 0.2 - 0.085 * k
            pen.line(bezier((0, yy - 0.03), (sx * 0.15, yy - 0.02), (sx * 0.28, yy + 0.03)),
                     mix(skin, dark, a1), 0.02)
    if a2 > 0:  # lateral forehead wrinkles above the raised outer brow
        for k in range(3):
            yy = base - 0.22 - 0.085 * k
            pen.line(bezier((sx * 0.24, yy), (sx * 0.42, yy - 0.04), (sx * 0.62, yy + 0.01)),
                     mix(skin, dark, a2), 0.02)
    if a4 > 0:  # vertical glabellar furrow between the lowered, drawn-together brows
        pen.line([(sx * 0.045, base - 0.05), (sx * 0.06, base + 0.1)], mix(skin, dark, a4), 0.024)


def draw_nose(pen: Pen, f: Face) -> None:
    idn, skin = f.id, f.id.skin
    a9, a10 = f.m("AU9"), f.m("AU10")
    lift = 0.05 * a9 + 0.02 * a10
    nw = idn.nose_w * (1 + 0.2 * a9)
    line = shade(skin, 0.72)
    for sx in (-1, 1):
        pen.line([(sx * 0.06, EYE_Y + 0.02), (sx * 0.075, NOSE_Y - 0.12)], shade(skin, 0.9), 0.014, z=0.7)
        pen.line(bezier((sx * 0.05, NOSE_Y - 0.06 - lift), (sx * (nw + 0.03), NOSE_Y - 0.05 - lift),
                        (sx * nw * 0.7, NOSE_Y + 0.04 - lift)), line, 0.02, z=0.8)
        pen.ellipse((sx * nw * 0.55, NOSE_Y + 0.03 - lift), 0.035, 0.017, shade(skin, 0.3), z=0.9)
    pen.line(bezier((-0.04, NOSE_Y + 0.05 - lift), (0, NOSE_Y + 0.07 - lift), (0.04, NOSE_Y + 0.05 - lift)),
             line, 0.012, z=1.0)
    if a9 > 0:  # horizontal wrinkles across the bridge
        c = mix(skin, crease_color(skin), a9)
        for k in range(3):
            yy = EYE_Y + 0.07 + 0.05 * k
            pen.line(bezier((-0.1, yy + 0.01), (0, yy - 0.03), (0.1, yy + 0.01)), c, 0.02, z=0.7)


def mouth_geometry(f: Face) -> dict:
    """Corner and lip-line positions of the mouth, from the mouth AUs (face units)."""
    idn = f.id
    corners = []
    for side, sx in ((0, -1), (1, 1)):
        a12, a14, a15, a20 = (f.s(au, side) for au in ("AU12", "AU14", "AU15", "AU20"))
        x = sx * idn.mouth_w * (1 + 0.22 * a12 + 0.4 * a20 + 0.06 * a14
                                - 0.22 * f.m("AU23") - 0.06 * f.m("AU24"))
        y = MOUTH_Y - 0.13 * a12 + 0.11 * a15 + 0.03 * a20 - 0.02 * a14 + 0.5 * f.jaw_drop * 0.3
        corners.append((x, y))
    gap = 0.0
    if f.m("AU25") > 0:
        gap = 0.035 + 0.03 * f.m("AU25") + 0.7 * f.jaw_drop
    thin = max(0.15, 1 - 0.6 * f.m("AU23") - 0.8 * f.m("AU24") - 0.25 * f.m("AU20"))
    mid_y = (corners[0][1] + corners[1][1]) / 2
    smile = 0.5 * (MOUTH_Y - mid_y)  # lifted corners bend the lip line
    # AU10 lifts the upper lip: with lips apart the teeth show, with lips closed the lip
    # bows up and thickens in the middle
    up_in = MOUTH_Y - gap * 0.3 + smile * 0.6 - (0.05 if gap else 0.015) * f.m("AU10") - 0.03 * f.m("AU17")
    lo_in = MOUTH_Y + gap * 0.7 + smile * 0.6 + (0.06 * f.m("AU16") if gap else 0) - 0.03 * f.m("AU17")
    return {"corners": corners, "gap": gap, "thin": thin, "up_in": up_in, "lo_in": lo_in,
            "up_h": idn.lip_h * 0.85 * thin + 0.06 * f.m("AU10") * (0 if gap else 1),
            "lo_h": idn.lip_h * 1.2 * thin}


def draw_mouth(pen: Pen, f: Face) -> None:
    idn, skin = f.id, f.id.skin
    g = mouth_geometry(f)
    (lx, ly), (rx, ry) = g["corners"]
    dark = crease_color(skin)
    # nasolabial folds, deepened by AU6/9/10/12
    for side, sx in ((0, -1), (1, 1)):
        deep = max(0.6 * f.s("AU6", side), f.s("AU9", side), f.s("AU10", side), 0.9 * f.s("AU12", side))
        cx, cy = g["corners"][side]
        pen.line(bezier((sx * (idn.nose_w + 0.05), NOSE_Y - 0.04), (sx * (idn.nose_w + 0.2), NOSE_Y + 0.12),
                        (cx + sx * 0.05, cy + 0.02)), mix(skin, dark, 0.15 + 0.75 * deep), 0.02, z=0.5)
    up_in = bezier((lx, ly), (0, 2 * g["up_in"] - (ly + ry) / 2), (rx, ry), 11)
    lo_in = bezier((lx, ly), (0, 2 * g["lo_in"] - (ly + ry) / 2), (rx, ry), 11)
    uu = np.abs(np.linspace(-1, 1, 11))
    bow = np.clip(1.0 - uu ** 2 * 0.9, 0, None) * (1 - 0.25 * np.exp(-(uu / 0.15) ** 2))  # Cupid's bow
    up_out = up_in - np.stack([np.zeros(11), g["up_h"] * bow], 1)
    lo_out = lo_in + np.stack([np.zeros(11), g["lo_h"] * np.clip(1.0 - uu ** 2, 0, None)], 1)
    lip = idn.lip_color
    pen.poly(np.concatenate([up_out, up_in[::-1]]), lip, z=0.6)
    pen.poly(np.concatenate([lo_in, lo_out[::-1]]), shade(lip, 1.08), z=0.6)
    if g["gap"] > 0:
        pen.poly(np.concatenate([up_in, lo_in[::-1]]), MOUTH_INSIDE, z=0.6)
        teeth_h = min(g["gap"] * 0.8, 0.06 + 0.03 * f.m("AU10"))
        inner = up_in[2:-2]
        pen.poly(np.concatenate([inner, inner[::-1] + (0, teeth_h)]), TEETH, z=0.6)
        if f.m("AU16") > 0 or f.m("AU26") > 0:
            inner = lo_in[3:-3]
            pen.poly(np.concatenate([inner, inner[::-1] - (0, min(g["gap"] * 0.35, 0.04))]), TEETH, z=0.6)
    else:
        press = f.m("AU24")
        pen.line(up_in, mix(shade(lip, 0.55), (40, 20, 20), press), 0.016 + 0.024 * press, z=0.6)
    if f.m("AU23") > 0:  # tightened lips: a hard red margin
        pen.line(up_out[1:-1], mix(lip, shade(lip, 0.5), f.m("AU23")), 0.02, z=0.6)
        pen.line(lo_out[1:-1], mix(lip, shade(lip, 0.5), f.m("AU23")), 0.02, z=0.6)
    if f.m("AU24") > 0:  # pressed lips: skin bulges above and below the mouth
        c = mix(skin, dark, f.m("AU24"))
        pen.line(up_out[2:-2] - (0, 0.045), c, 0.026, z=0.6)
        pen.line(lo_out[2:-2] + (0, 0.045), c, 0.026, z=0.6)
    for side, sx in ((0, -1), (1, 1)):
        cx, cy = g["corners"][side]
        a14, a15 = f.s("AU14", side), f.s("AU15", side)
        if a14 > 0:  # dimple just outside the tucked corner
            pen.line(bezier((cx + sx * 0.04, cy - 0.06), (cx + sx * 0.09, cy), (cx + sx * 0.04, cy + 0.06)),
                     mix(skin, dark, a14), 0.03, z=0.5)
        a20 = f.s("AU20", side)
        if a20 > 0:  # stretched lips: skin folds pulled sideways from the corner
            pen.line([(cx + sx * 0.03, cy), (cx + sx * 0.13, cy + 0.03)], mix(skin, dark, a20), 0.026, z=0.5)
        if a15 > 0:  # down-turned corner crease
            pen.line([(cx, cy), (cx + sx * 0.035, cy + 0.1)], mix(skin, dark, a15), 0.026, z=0.5)
    a17 = f.m("AU17")
    chin_y = MOUTH_Y + 0.27 + f.jaw_drop
    if a17 > 0:  # chin boss: mentolabial crease and dimpled ("orange peel") chin
        c = mix(skin, dark, a17)
        pen.line(bezier((-0.14, g["lo_in"] + g["lo_h"] + 0.06), (0, g["lo_in"] + g["lo_h"] + 0.1),
                        (0.14, g["lo_in"] + g["lo_h"] + 0.06)), c, 0.022, z=0.6)
        for dx, dy in ((-0.07, 0.0), (0.0, 0.02), (0.07, 0.0), (-0.035, 0.07), (0.035, 0.07)):
            pen.ellipse((dx, chin_y + dy), 0.018, 0.014, c, z=0.6, n=8)


def render_face(params: FaceParams, size: int, supersample: int = 2) -> Image.Image:
    """Render one face as an RGB `size` x `size` image (deterministic in `params`)."""
    side = size * supersample
    img = Image.new("RGB", (side, side))
    draw_background(img, params)
    f = Face(params)
    pen = Pen(img, params)
    draw_head(pen, f)
    draw_nose(pen, f)
    for side_i in (0, 1):
        draw_eye(pen, f, side_i)
        draw_brow(pen, f, side_i)
    draw_mouth(pen, f)
    if supersample > 1:
        img = img.resize((size, size), Image.BOX)
    n = params.nuisance
    if n.blur > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(n.blur * size / 112))
    x = np.asarray(img, dtype=np.float32)
    grid = (np.arange(size, dtype=np.float32) / size - 0.5)
    ramp = math.cos(n.light_dir) * grid[None, :] + math.sin(n.light_dir) * grid[:, None]
    x = x * (n.brightness * (1 + n.light_strength * 2 * ramp))[:, :, None]
    rng = np.random.default_rng(params.seed)
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(n.noise)
    return Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8))
