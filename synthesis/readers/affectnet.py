"""AffectNet reader: the official manually annotated lists, training.csv and validation.csv.

Layout read (the official AffectNet release, as parsed by public code that splits each line into
`subDirectory_filePath, face_x, face_y, face_width, face_height, facial_landmarks, expression,
valence, arousal`):

    <root>/Manually_Annotated_file_lists/training.csv     header row, then one face per row;
    <root>/Manually_Annotated_file_lists/validation.csv   landmarks are ";"-separated in one cell
    <root>/Manually_Annotated_Images/<subDirectory_filePath>

Expression ids: 0 neutral, 1 happy, 2 sad, 3 surprise, 4 fear, 5 disgust, 6 anger, 7 contempt
(mapped to facs.EMOTIONS names); 8 none, 9 uncertain, 10 non-face are left out and counted per
id; any other value raises. training.csv -> split "train"; validation.csv -> split "test"
(Exp-BLIP tests on the official validation set, 4,000 images, 500 per class). Only
subDirectory_filePath and expression are required; the face box and valence/arousal go to
`Record.meta` when present. Records carry no AUs (emotion dataset).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from expvl.synthesis.readers.common import (
    ReaderError,
    Records,
    check_record,
    check_unique_ids,
    parse_float,
    parse_int,
    where,
)
from expvl.vocab.records import Record

EXPRESSIONS = {0: "neutral", 1: "happiness", 2: "sadness", 3: "surprise", 4: "fear",
               5: "disgust", 6: "anger", 7: "contempt"}
DROPPED_EXPRESSIONS = {8: "none", 9: "uncertain", 10: "non-face"}
SPLIT_FILES = {"train": "training.csv", "test": "validation.csv"}
_REQUIRED = ("subDirectory_filePath", "expression")


@dataclass
class AffectNetConfig:
    """What `read_affectnet` reads (`python -m expvl.synthesis source=affectnet affectnet.<field>=...`)."""

    splits: list[str] = field(default_factory=lambda: ["train", "test"])  # lists read: "train"
    #   (training.csv) and/or "test" (validation.csv)
    lists_dir: str = "Manually_Annotated_file_lists"  # folder of the two CSVs, relative to root
    images_dir: str = "Manually_Annotated_Images"  # image folder relative to root; joined to
    #   subDirectory_filePath


def read_affectnet(root: Path, config: AffectNetConfig | None = None) -> Records:
    """Read AffectNet expression labels from `root` (image paths relative to it) as `config`
    (default `AffectNetConfig()`) says."""
    cfg = config or AffectNetConfig()
    root = Path(root)
    records = Records()
    for split in cfg.splits:
        if split not in SPLIT_FILES:
            raise ReaderError(f"affectnet.splits: unknown split {split!r}; known: {list(SPLIT_FILES)}")
        path = root / cfg.lists_dir / SPLIT_FILES[split]
        if not path.is_file():
            raise ReaderError(f"{where(path)}: AffectNet list not found")
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise ReaderError(f"{where(path, 1)}: header lacks column(s) {missing}")
            for row in reader:
                loc = where(path, reader.line_num)
                if None in row or any(v is None for v in row.values()):
                    raise ReaderError(f"{loc}: expected {len(reader.fieldnames)} columns")
                expression = parse_int(row["expression"], loc, "expression")
                if expression in DROPPED_EXPRESSIONS:
                    records.drop(f"affectnet: expression {expression} "
                                 f"({DROPPED_EXPRESSIONS[expression]})")
                    continue
                if expression not in EXPRESSIONS:
                    raise ReaderError(f"{loc}: expression must be 0..10, got {expression}")
                rel = row["subDirectory_filePath"].strip()
                if not rel:
                    raise ReaderError(f"{loc}: empty subDirectory_filePath")
                meta = {}
                if all(k in row for k in ("face_x", "face_y", "face_width", "face_height")):
                    meta["face_box"] = [parse_int(row[k], loc, k)
                                        for k in ("face_x", "face_y", "face_width", "face_height")]
                for k in ("valence", "arousal"):
                    if k in row:
                        meta[k] = parse_float(row[k], loc, k)
                records.append(check_record(Record(
                    id=f"affectnet/{rel}", image=f"{cfg.images_dir}/{rel}", source="affectnet",
                    split=split, emotion=EXPRESSIONS[expression], meta=meta), loc))
    check_unique_ids(records, str(root / cfg.lists_dir))
    return records.summary("affectnet", root)
