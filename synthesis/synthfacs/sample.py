"""SynthFACS sampling: identities, AU / emotion labels with FACS constraints, nuisances.

Everything random about one face is drawn here, from a numpy Generator seeded by
(cfg.seed, split, index), so `render.py` is a pure function of `FaceParams`.

Labels (checked against the EMFACS prototypes as commonly cited; they are not from the papers):
- emotion faces: the prototype AUs of `vocab.facs.PROTOTYPES`; with `p_drop` one AU of a
  prototype with 3+ AUs is dropped, with `p_extra` one AU of `EXTRA_AUS` (AUs that define no
  emotion) is added. Contempt is unilateral (one random side); all others bilateral.
- random faces: 1-5 AUs drawn with weights that lift AUs rare in the prototypes, no emotion.
- FACS constraints applied to every label set: AU26 implies AU25; AU16 implies AU25 (the
  depressed lower lip parts the lips, and "lips apart" is what AU25 means); AU24 (lips
  pressed) excludes AU25/26; AU5 and AU43 are exclusive; AU12 and AU15 are exclusive (they
  pull the same lip corner in opposite directions, so the picture would be ambiguous).
- intensities: an active AU has intensity uniform in [2, 5] (FACS occurrence in DISFA-style
  datasets means >= 2), with probability `p_low_intensity` uniform in [1, 2] instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from expvl.vocab.facs import EMOTIONS, PROTOTYPES, SYNTHFACS_AUS, UNILATERAL_PROTOTYPES

SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}

# Extra AUs added to emotion faces: none is part of an emotion prototype's identity.
EXTRA_AUS = ("AU10", "AU17", "AU24", "AU25", "AU43", "AU6", "AU7")

# Random-combination weights: AUs absent from every prototype are drawn more often, so each
# AU reaches >= 8 % prevalence over the whole dataset (tested).
RANDOM_WEIGHTS = {au: 1.0 for au in SYNTHFACS_AUS}
RANDOM_WEIGHTS.update({"AU10": 2.2, "AU17": 2.2, "AU24": 3.0, "AU43": 2.2, "AU14": 1.8,
                       "AU9": 1.6, "AU16": 1.4, "AU20": 1.6, "AU23": 1.6, "AU6": 1.3,
                       "AU25": 0.6, "AU1": 0.7, "AU4": 0.7, "AU5": 0.7})

# Pairs `apply_constraints` resolves by dropping one AU: an extra AU must not evict a prototype AU.
CONFLICTS = {"AU5": {"AU43"}, "AU43": {"AU5"}, "AU12": {"AU15"}, "AU15": {"AU12"},
             "AU24": {"AU25", "AU26", "AU16"}}

SKIN_TONES = np.array([  # Fitzpatrick I-VI-ish anchors; identities interpolate between them
    (255, 224, 206), (241, 194, 167), (224, 172, 138), (198, 134, 96), (161, 102, 68),
    (120, 74, 48), (84, 52, 36)], dtype=np.float64)
HAIR_COLORS = np.array([(20, 16, 14), (58, 38, 26), (100, 66, 40), (160, 120, 70),
                        (210, 180, 120), (150, 60, 30), (130, 130, 130)], dtype=np.float64)
IRIS_COLORS = np.array([(60, 40, 25), (90, 60, 30), (60, 100, 140), (70, 110, 70),
                        (40, 30, 25)], dtype=np.float64)


@dataclass
class Identity:
    id: str  # "id0042"
    skin: tuple[int, int, int]  # base skin RGB
    hair: tuple[int, int, int]  # hair and brow RGB
    iris: tuple[int, int, int]
    hair_style: int  # 0 bald/shaved, 1 short, 2 long, 3 side part, 4 bun
    face_w: float  # face half-width in face units
    face_h: float  # face half-height
    jaw: float  # 0 narrow/pointed jaw .. 1 square jaw
    eye_dx: float  # eye centre distance from the midline
    eye_w: float  # eye half-width
    eye_h: float  # neutral eye half-height (aperture)
    brow_h: float  # neutral brow height above the eye
    brow_w: float  # brow thickness
    nose_w: float  # nostril half-spread
    mouth_w: float  # neutral mouth half-width
    lip_h: float  # lip thickness
    lip_color: tuple[int, int, int]
    shirt: tuple[int, int, int]


@dataclass
class Nuisance:
    roll: float  # degrees, in-plane rotation
    yaw: float  # -1..1, fake out-of-plane turn (features shift by depth)
    scale: float  # face size factor
    shift: tuple[float, float]  # centre offset as a fraction of the image side
    light_dir: float  # radians, direction of the brightness gradient
    light_strength: float  # 0..1 gradient depth
    brightness: float  # global gain
    noise: float  # Gaussian pixel noise sigma (0-255 scale)
    blur: float  # Gaussian blur radius in output pixels
    background: int  # 0 plain, 1 gradient, 2 clutter
    bg_seed: int  # seed of the background clutter


@dataclass
class Expression:
    # per-side intensities 0-5: (image-left side, image-right side); absent = 0 on both
    sides: dict[str, tuple[float, float]] = field(default_factory=dict)
    emotion: str | None = None

    def intensity(self, au: str) -> float:
        """FACS intensity of the AU: the stronger side."""
        return max(self.sides.get(au, (0.0, 0.0)))

    @property
    def active(self) -> list[str]:
        return [au for au in SYNTHFACS_AUS if self.intensity(au) > 0]


@dataclass
class FaceParams:
    identity: Identity
    expression: Expression
    nuisance: Nuisance
    seed: int  # the face's own seed (texture details)


def face_seed(master: int, split: str, index: int) -> int:
    """Per-face seed from (master seed, split, index): independent of worker scheduling."""
    ss = np.random.SeedSequence([int(master), _SPLIT_CODE[split], int(index)])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def identity_pool(cfg, split: str) -> range:
    """Global identity indices of a split: train, val, test pools are disjoint ranges."""
    n_tr, n_te = cfg.n_identities_train, cfg.n_identities_test
    start = {"train": 0, "val": n_tr, "test": n_tr + n_te}[split]
    return range(start, start + (n_tr if split == "train" else n_te))


@functools.lru_cache(maxsize=4096)  # faces of one identity share it; render never mutates it
def sample_identity(master: int, index: int) -> Identity:
    """Identity number `index` of the dataset with master seed `master` (deterministic)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(master), 7, int(index)]))
    t = rng.uniform(0, len(SKIN_TONES) - 1)  # full range of skin tones, uniformly
    lo = int(t)
    skin = SKIN_TONES[lo] + (SKIN_TONES[min(lo + 1, len(SKIN_TONES) - 1)] - SKIN_TONES[lo]) * (t - lo)
    skin = skin * rng.uniform(0.95, 1.05, 3)
    hair = HAIR_COLORS[rng.integers(len(HAIR_COLORS))] * rng.uniform(0.85, 1.15)
    lip = skin * np.array([0.85, 0.6, 0.6]) + np.array([20, 0, 5])
    shirt = rng.integers(30, 230, 3)

    def rgb(a):
        return tuple(int(v) for v in np.clip(a, 0, 255))

    return Identity(
        id=f"id{index:04d}", skin=rgb(skin), hair=rgb(hair),
        iris=rgb(IRIS_COLORS[rng.integers(len(IRIS_COLORS))]), hair_style=int(rng.integers(5)),
        face_w=rng.uniform(0.78, 0.92), face_h=rng.uniform(1.08, 1.22), jaw=rng.uniform(0, 1),
        eye_dx=rng.uniform(0.31, 0.39), eye_w=rng.uniform(0.15, 0.18), eye_h=rng.uniform(0.058, 0.072),
        brow_h=rng.uniform(0.17, 0.22), brow_w=rng.uniform(0.035, 0.06), nose_w=rng.uniform(0.09, 0.13),
        mouth_w=rng.uniform(0.24, 0.31), lip_h=rng.uniform(0.045, 0.065), lip_color=rgb(lip),
        shirt=rgb(shirt))


def _intensity(rng: np.random.Generator, p_low: float) -> float:
    return float(rng.uniform(1.0, 2.0) if rng.random() < p_low else rng.uniform(2.0, 5.0))


def apply_constraints(aus: set[str], rng: np.random.Generator) -> set[str]:
    """Make an AU set FACS-consistent (see the module docstring). Returns a new set."""
    aus = set(aus)
    if "AU5" in aus and "AU43" in aus:
        aus.discard("AU5" if rng.random() < 0.5 else "AU43")
    if "AU12" in aus and "AU15" in aus:
        aus.discard("AU12" if rng.random() < 0.5 else "AU15")
    if "AU24" in aus and aus & {"AU25", "AU26", "AU16"}:
        aus.discard("AU24")  # an open mouth wins: pressed lips cannot be apart
    if aus & {"AU26", "AU16"}:
        aus.add("AU25")
    return aus


def sample_emotion_aus(emotion: str, cfg, rng: np.random.Generator) -> set[str]:
    aus = set(PROTOTYPES[emotion])
    if len(aus) >= 3 and rng.random() < cfg.p_drop:
        aus.discard(sorted(aus)[rng.integers(len(aus))])
    if rng.random() < cfg.p_extra:
        choices = [a for a in EXTRA_AUS if a not in aus and not CONFLICTS.get(a, set()) & aus]
        aus.add(choices[rng.integers(len(choices))])
    if emotion == "contempt":
        aus -= {"AU25", "AU26", "AU16", "AU24"}  # keep the one-sided smirk the visible cue
    return aus


def sample_random_aus(rng: np.random.Generator) -> set[str]:
    k = int(rng.integers(1, 6))
    p = np.array([RANDOM_WEIGHTS[a] for a in SYNTHFACS_AUS])
    picked = rng.choice(len(SYNTHFACS_AUS), size=k, replace=False, p=p / p.sum())
    return {SYNTHFACS_AUS[i] for i in picked}


def sample_expression(cfg, rng: np.random.Generator) -> Expression:
    if rng.random() < cfg.emotion_fraction:
        emotion = EMOTIONS[rng.integers(len(EMOTIONS))]
        aus = apply_constraints(sample_emotion_aus(emotion, cfg, rng), rng)
    else:
        emotion = None
        aus = apply_constraints(sample_random_aus(rng), rng)
    sides = {}
    one_side = int(rng.integers(2))  # which side a unilateral prototype acts on
    for au in sorted(aus):
        v = _intensity(rng, cfg.p_low_intensity)
        other = float(np.clip(v + rng.uniform(-0.3, 0.3), 1.0, 5.0))  # natural asymmetry
        pair = (v, other) if rng.random() < 0.5 else (other, v)
        if emotion in UNILATERAL_PROTOTYPES and au in PROTOTYPES[emotion]:
            pair = (v, 0.0) if one_side == 0 else (0.0, v)
        sides[au] = (round(pair[0], 2), round(pair[1], 2))
    return Expression(sides=sides, emotion=emotion)


def sample_nuisance(rng: np.random.Generator) -> Nuisance:
    return Nuisance(
        roll=float(rng.uniform(-8, 8)), yaw=float(rng.uniform(-0.6, 0.6)),
        scale=float(rng.uniform(0.9, 1.08)),
        shift=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
        light_dir=float(rng.uniform(0, 2 * np.pi)), light_strength=float(rng.uniform(0, 0.35)),
        brightness=float(rng.uniform(0.8, 1.12)), noise=float(rng.uniform(0, 6)),
        blur=float(rng.uniform(0, 0.6)), background=int(rng.integers(3)),
        bg_seed=int(rng.integers(2**31)))


def sample_params(cfg, split: str, index: int) -> FaceParams:
    """All random choices of face `index` of `split` (deterministic per (cfg.seed, split, index))."""
    seed = face_seed(cfg.seed, split, index)
    rng = np.random.default_rng(seed)
    pool = identity_pool(cfg, split)
    identity = sample_identity(cfg.seed, pool[int(rng.integers(len(pool)))])
    expression = sample_expression(cfg, rng)
    return FaceParams(identity=identity, expression=expression, nuisance=sample_nuisance(rng),
                      seed=seed)
