"""DISFA reader: per-subject, per-AU intensity files; occurrence = intensity >= 2.

Layout read (the official DISFA distribution, checked against ME-GraphAU
`tool/DISFA_image_label_process.py`):

    <root>/ActionUnit_Labels/SN001/SN001_au1.txt     one file per subject and AU; one line per
                                                      frame: "<frame>,<intensity 0-5>"
    <root>/img/SN001/0.png                            frame images, named by the 0-based row index
                                                      (ME-GraphAU's `data/DISFA/img/SN001/0.png`)

ME-GraphAU binarises with `AUIntensity >= 2` and names image i after the i-th line of the label
file, which is what the defaults reproduce. Differences on purpose: ME-GraphAU silently skips a
missing AU file (leaving zeros); we raise. We also check that every AU file of a subject lists
the same frames in the same order, and raise naming the first disagreeing line.

Our assumptions: the image folder and naming come from preprocessing repos (frames extracted
from the left/right camera videos), so `image_template` is a parameter with fields subject,
frame (the number written in the file) and index (0-based row). Labels are shared by both
cameras. Records carry split "all"; the subject-exclusive folds and splits are in `folds.py`
(`python -m expvl.synthesis split.*`).

Options are `DISFAConfig`. AU sets: the default is the usual 8-AU protocol (1, 2, 4, 6, 9, 12, 25,
26); `DISFAConfig(aus=list(facs.DATASET_AUS["disfa12"]))` (CLI:
`disfa.aus=[1,2,4,5,6,9,12,15,17,20,25,26]`) reads all 12 annotated AUs. Intensities are kept in
`Record.intensities`.
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
    label_pairs,
    parse_int,
    resolve_aus,
    where,
)
from expvl.vocab.facs import AUS, DATASET_AUS
from expvl.vocab.records import Record

_SUBJECT = re.compile(r"^SN\d{3}$")


def _read_au_file(path: Path) -> list[tuple[int, int, int]]:
    """[(line, frame, intensity)] of one SNxxx_auN.txt file."""
    rows = []
    for line_no, loc, frame_text, intensity_text in label_pairs(path, "missing DISFA label file",
                                                                "<frame>,<intensity>", sep=","):
        frame = parse_int(frame_text, loc, "frame number")
        intensity = parse_int(intensity_text, loc, "intensity")
        if not 0 <= intensity <= 5:
            raise ReaderError(f"{loc}: intensity must be in 0..5, got {intensity}")
        rows.append((line_no, frame, intensity))
    return rows


@dataclass
class DISFAConfig:
    """What `read_disfa` reads (`python -m expvl.synthesis source=disfa disfa.<field>=...`)."""

    aus: list[str] = field(default_factory=lambda: list(DATASET_AUS["disfa"]))  # AUs read ("AU1" or
    #   1); default the 8-AU protocol; all 12 (DATASET_AUS["disfa12"]): [1,2,4,5,6,9,12,15,17,20,25,26]
    labels_dir: str = "ActionUnit_Labels"  # folder of one SNxxx folder per subject, relative to root
    image_template: str = "img/{subject}/{index}.png"  # image path relative to root; fields
    #   subject, frame (as written in the file), index (0-based row)
    occurrence_threshold: int = 2  # an AU occurs when its intensity is >= this (the protocol: 2)
    subjects: list[str] | None = None  # read only these subjects; None = every SNxxx folder
    frame_sampling: bool = False  # Exp-BLIP's 1-in-`sample_every` + AU-change sampling per video
    sample_every: int = 10  # the "1 of every N frames" of that sampling


def read_disfa(root: Path, config: DISFAConfig | None = None) -> Records:
    """Read DISFA AU intensity labels from `root` (image paths relative to it) as `config`
    (default `DISFAConfig()`) says."""
    cfg = config or DISFAConfig()
    root = Path(root)
    aus = resolve_aus(cfg.aus, "disfa.aus")
    label_root = root / cfg.labels_dir
    if not label_root.is_dir():
        raise ReaderError(f"{where(label_root)}: DISFA label folder not found")
    subjects = cfg.subjects
    if subjects is None:
        subjects = sorted(p.name for p in label_root.iterdir() if p.is_dir() and _SUBJECT.match(p.name))
        if not subjects:
            raise ReaderError(f"{where(label_root)}: no SNxxx subject folders found")
    records, videos = Records(), {}
    for subject in subjects:
        per_au = {au: _read_au_file(label_root / subject / f"{subject}_au{AUS[au].id}.txt")
                  for au in aus}
        first_au = aus[0]
        first_path = label_root / subject / f"{subject}_au{AUS[first_au].id}.txt"
        reference = per_au[first_au]
        for au, rows in per_au.items():
            path = label_root / subject / f"{subject}_au{AUS[au].id}.txt"
            if len(rows) != len(reference):
                raise ReaderError(f"{where(path)}: {len(rows)} frames, but {first_path.name} has "
                                  f"{len(reference)}")
            for (line_no, frame, _), (_, ref_frame, _) in zip(rows, reference):
                if frame != ref_frame:
                    raise ReaderError(f"{where(path, line_no)}: frame {frame}, but "
                                      f"{first_path.name} has frame {ref_frame} at this row")
        frames = videos.setdefault(subject, [])
        seen = set()
        for index, (line_no, frame, _) in enumerate(reference):
            loc = where(first_path, line_no)
            if frame in seen:
                raise ReaderError(f"{loc}: frame {frame} appears twice")
            seen.add(frame)
            intensities = {au: float(per_au[au][index][2]) for au in aus}
            frames.append(check_record(Record(
                id=f"disfa/{subject}/{frame}",
                image=format_image(cfg.image_template, loc, subject=subject, frame=frame, index=index),
                source="disfa", split="all", subject=subject,
                aus={au: int(v >= cfg.occurrence_threshold) for au, v in intensities.items()},
                intensities=intensities, meta={"frame": frame}), loc))
    add_videos(videos, records, sample_every=cfg.sample_every if cfg.frame_sampling else None)
    check_unique_ids(records, str(label_root))
    return records.summary("disfa", root)
