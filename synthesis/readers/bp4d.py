"""BP4D-Spontaneous reader: AU occurrence CSVs, one per subject and task.

Layout read (the official BP4D distribution as consumed by ME-GraphAU
`tool/BP4D_image_label_process.py` and JAA-Net):

    <root>/AUCoding/AU_OCC/F001_T1.csv     one file per subject (F001..F023, M001..M018) and task
                                           (T1..T8); layout in `frame_csv.py` (0/1, 9 = not coded)
    <root>/img/F001/T1/2440.jpg            frame images named by the CSV frame number (ME-GraphAU's
                                           `data/BP4D/img/F001/T1/2440.jpg`)

Our assumptions: the image folder and naming are a convention of the preprocessing repos, not of
BP4D itself, so `image_template` is a parameter (fields: subject, task, frame; e.g.
"Sequences/{subject}/{task}/{frame:04d}.jpg" for zero-padded names). Label files whose name is not
`<subject>_<task>.csv` raise. Frames where none of the requested AUs is coded (all 9) are left
out and counted. Records carry split "all": the subject-exclusive folds and splits are in
`folds.py` (`python -m expvl.synthesis split.*`).

Options are `BP4DConfig`: the default AU set is the 12-AU protocol (facs.DATASET_AUS["bp4d"]);
`frame_sampling=True` applies Exp-BLIP's 1-in-10 + AU-change sampling per (subject, task) video.
"""

from __future__ import annotations

import re
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

_NAME = re.compile(r"^(?P<subject>[FM]\d{3})_(?P<task>T\d+)$")


@dataclass
class BP4DConfig:
    """What `read_bp4d` reads (`python -m expvl.synthesis source=bp4d bp4d.<field>=...`)."""

    aus: list[str] = field(default_factory=lambda: list(DATASET_AUS["bp4d"]))  # CSV columns read
    #   ("AU1" or 1); default the 12-AU protocol
    labels_dir: str = "AUCoding/AU_OCC"  # folder of <subject>_<task>.csv files, relative to root
    image_template: str = "img/{subject}/{task}/{frame}.jpg"  # image path relative to root; fields
    #   subject, task, frame ("{frame:04d}" for zero-padded names)
    subjects: list[str] | None = None  # read only these subjects (each must have a file); None = all
    frame_sampling: bool = False  # Exp-BLIP's 1-in-`sample_every` + AU-change sampling per video
    sample_every: int = 10  # the "1 of every N frames" of that sampling


def read_bp4d(root: Path, config: BP4DConfig | None = None) -> Records:
    """Read BP4D AU occurrence labels from `root` (label files under `root/labels_dir`, image
    paths relative to root) as `config` (default `BP4DConfig()`) says."""
    cfg = config or BP4DConfig()
    root = Path(root)
    aus = resolve_aus(cfg.aus, "bp4d.aus")
    label_root = root / cfg.labels_dir
    files = sorted(label_root.glob("*.csv"))
    if not files:
        raise ReaderError(f"{where(label_root)}: no BP4D label files (*.csv) found")
    wanted = set(cfg.subjects) if cfg.subjects is not None else None
    records, videos = Records(), {}
    found_subjects = set()
    for path in files:
        m = _NAME.match(path.stem)
        if not m:
            raise ReaderError(f"{where(path)}: BP4D label files are named <subject>_<task>.csv "
                              f"(e.g. F001_T1.csv)")
        subject, task = m["subject"], m["task"]
        if wanted is not None and subject not in wanted:
            continue
        found_subjects.add(subject)
        frames = videos.setdefault(f"{subject}/{task}", [])
        for row in read_frame_csv(path, aus):
            loc = where(path, row.line)
            if not row.aus:
                records.drop("bp4d: frame with none of the requested AUs coded (all 9)")
                continue
            frames.append(check_record(Record(
                id=f"bp4d/{subject}/{task}/{row.frame}",
                image=format_image(cfg.image_template, loc, subject=subject, task=task,
                                   frame=row.frame),
                source="bp4d", split="all", subject=subject, aus=row.aus,
                meta={"task": task, "frame": row.frame}), loc))
    if wanted is not None and wanted - found_subjects:
        raise ReaderError(f"{where(label_root)}: no label files for subjects "
                          f"{sorted(wanted - found_subjects)}")
    add_videos(videos, records, sample_every=cfg.sample_every if cfg.frame_sampling else None)
    check_unique_ids(records, str(label_root))
    return records.summary("bp4d", root)
