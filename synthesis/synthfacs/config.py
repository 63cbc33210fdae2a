"""SynthFACS configuration: what to render, how many faces, from how many identities.

The config hash names a rendered dataset on disk: every field that changes a pixel or a label
is hashed; `workers` is not, because a render is byte-identical whatever the worker count.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

# Bump when the renderer or the sampler changes what a given seed produces, so old caches
# are refused instead of silently mixed with new faces.
RENDERER_VERSION = 1


@dataclass
class SynthFACSConfig:
    size: int = 112  # output side in pixels (square); tiny tests use 64
    n_train: int = 6000  # faces in the train split
    n_val: int = 500  # faces in the val split
    n_test: int = 1000  # faces in the test split
    n_identities_train: int = 300  # identities the train faces are drawn from
    n_identities_test: int = 100  # identities of val and of test (each its own pool, both
    #                               disjoint from train and from each other)
    emotion_fraction: float = 0.6  # share of faces showing an emotion prototype; the rest show
    #                                random AU combinations with no emotion label
    p_drop: float = 0.15  # chance an emotion face drops one prototype AU (only prototypes of
    #                       3+ AUs, so the emotion stays recoverable from the AUs)
    p_extra: float = 0.3  # chance an emotion face gains one extra AU (from EXTRA_AUS, which
    #                       define no emotion)
    p_low_intensity: float = 0.1  # chance an active AU gets intensity 1-2 instead of 2-5
    seed: int = 0  # master seed; each face's seed derives from (seed, split, index)
    supersample: int = 2  # draw at size * supersample, then box-downsample (anti-aliasing)
    workers: int = 0  # render processes; 0 = os.cpu_count(). Not hashed.

    def __post_init__(self):
        if self.size < 32:
            raise ValueError(f"SynthFACSConfig.size must be >= 32, got {self.size}")
        if self.supersample < 1:
            raise ValueError(f"SynthFACSConfig.supersample must be >= 1, got {self.supersample}")
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"SynthFACSConfig.{name} must be >= 0")
        for name in ("n_identities_train", "n_identities_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"SynthFACSConfig.{name} must be >= 1")
        for name in ("emotion_fraction", "p_drop", "p_extra", "p_low_intensity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SynthFACSConfig.{name} must be in [0, 1]")


def hashed_fields(cfg: SynthFACSConfig) -> dict:
    """The fields that determine the rendered bytes, plus the renderer version."""
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "workers"}
    d["renderer_version"] = RENDERER_VERSION
    return d


def config_hash(cfg: SynthFACSConfig) -> str:
    """Stable 16-hex-digit hash of the output-determining fields."""
    blob = json.dumps(hashed_fields(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_from_dict(d: dict) -> SynthFACSConfig:
    known = {f.name for f in fields(SynthFACSConfig)}
    return SynthFACSConfig(**{k: v for k, v in d.items() if k in known})


def config_to_dict(cfg: SynthFACSConfig) -> dict:
    return asdict(cfg)
