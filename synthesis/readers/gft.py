"""GFT (Sayette Group Formation Task) reader: frame-level AU occurrence, one table per video.

The GFT frame-level annotations are distributed as meta-data on OSF (osf.io/7wcyz, Girard et
al., FG 2017); we could not check their exact file layout from public code. ASSUMED layout, the
same frame-by-AU table as BP4D (same lab, same coding conventions; see `frame_csv.py`):

    <root>/labels/<video>.csv      header "frame,1,2,4,..." (or "frame,AU1,..."), rows of 0/1,
                                   9 = not coded; one file per participant video
    <root>/img/<video>/<frame>.jpg frame images

The subject id is the file stem (one participant per video in GFT). If your copy is laid out
differently, convert it to this table once, or use `read_csv_generic`. Frames with none of the
requested AUs coded are left out and counted. Records carry split "all": GFT's train/test
partition (Exp-BLIP: 78 train / 18 test subjects) is applied with `folds.split_by_subjects`, or a
seeded subject split with `python -m expvl.synthesis split.*`.

Options are `GFTConfig`. Default AU set: facs.DATASET_AUS["gft"] (1, 2, 4, 6, 10, 12, 14, 15, 23,
24). Exp-BLIP samples both GFT train and test frames with `frame_sampling=True`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from expvl.synthesis.readers.common import (
    ReaderError,
    Records,
    add_videos,
    check_record,
    check_unique_ids,
    format_image,
    resolve_aus,
    where,
)
from expvl.synthesis.readers.frame_csv import read_frame_csv
from expvl.vocab.facs import DATASET_AUS
from expvl.vocab.records import Record


@dataclass
class GFTConfig:
    """What `read_gft` reads (`python -m expvl.synthesis source=gft gft.<field>=...`)."""

    aus: list[str] = field(default_factory=lambda: list(DATASET_AUS["gft"]))  # AUs read; default the 10
    labels_dir: str = "labels"  # folder of <video>.csv tables, relative to root
    image_template: str = "img/{video}/{frame}.jpg"  # image path relative to root; fields video,
    #   subject, frame
    frame_sampling: bool = False  # Exp-BLIP's 1-in-`sample_every` + AU-change sampling per video
    sample_every: int = 10  # the "1 of every N frames" of that sampling


def read_gft(root: Path, config: GFTConfig | None = None) -> Records:
    """Read GFT AU occurrence tables (assumed layout, see the module docstring) from `root`
    (image paths relative to it) as `config` (default `GFTConfig()`) says."""
    cfg = config or GFTConfig()
    root = Path(root)
    aus = resolve_aus(cfg.aus, "gft.aus")
    label_root = root / cfg.labels_dir
    files = sorted(label_root.glob("*.csv"))
    if not files:
        raise ReaderError(f"{where(label_root)}: no GFT label tables (*.csv) found")
    records, videos = Records(), {}
    for path in files:
        video = path.stem
        frames = videos.setdefault(video, [])
        for row in read_frame_csv(path, aus):
            loc = where(path, row.line)
            if not row.aus:
                records.drop("gft: frame with none of the requested AUs coded (all 9)")
                continue
            frames.append(check_record(Record(
                id=f"gft/{video}/{row.frame}",
                image=format_image(cfg.image_template, loc, video=video, subject=video, frame=row.frame),
                source="gft", split="all", subject=video, aus=row.aus,
                meta={"frame": row.frame}), loc))
    add_videos(videos, records, sample_every=cfg.sample_every if cfg.frame_sampling else None)
    check_unique_ids(records, str(label_root))
    return records.summary("gft", root)
