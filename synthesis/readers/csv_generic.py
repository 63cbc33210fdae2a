"""Generic CSV reader: the escape hatch for any AU / emotion dataset converted to one table.

Layout (ours, documented for users):

    image,AU1,AU2,AU12,emotion          header; "image" first; AU columns spelled AU1 / AU01 / 1;
    faces/0001.jpg,1,0,1,happiness      optional columns: emotion, subject, split
    faces/0002.jpg,0,,0,                an empty cell = not annotated; emotion may be empty

AU values are occurrences (0/1) or FACS intensities (0-5, occurrence = intensity >= threshold).
`values="auto"` treats the file as intensities when any AU value is not 0 or 1; "occurrence"
and "intensity" force one reading. Any other column raises, naming it. Emotions go through
facs.emotion_name ("Happy" -> "happiness"). Rows with neither an annotated AU nor an emotion
raise (a row that labels nothing is a mistake, not a category to drop).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from expvl.synthesis.readers.common import (
    ReaderError,
    Records,
    check_record,
    check_unique_ids,
    parse_float,
    where,
)
from expvl.vocab.facs import au_name, emotion_name
from expvl.vocab.records import Record

_OPTIONAL = ("emotion", "subject", "split")
VALUE_MODES = ("auto", "occurrence", "intensity")


@dataclass
class CSVConfig:
    """What `read_csv_generic` reads (`python -m expvl.synthesis source=csv csv.<field>=...`)."""

    label_file: str = "labels.csv"  # the CSV, relative to root
    values: str = "auto"  # "auto", "occurrence" (0/1) or "intensity" (0-5); see the module docstring
    occurrence_threshold: float = 2.0  # intensity at or above which an AU occurs (intensity mode)
    source: str = "csv"  # Record.source and id prefix
    default_split: str = "all"  # split of rows when the file has no split column


def read_csv_generic(root: Path, config: CSVConfig | None = None) -> Records:
    """Read a generic `image,AU1,...,emotion` CSV from `root` (the image column is relative to it)
    as `config` (default `CSVConfig()`) says."""
    cfg = config or CSVConfig()
    if cfg.values not in VALUE_MODES:
        raise ReaderError(f"csv.values must be one of {VALUE_MODES}, got {cfg.values!r}")
    root = Path(root)
    path = root / cfg.label_file
    if not path.is_file():
        raise ReaderError(f"{where(path)}: label CSV not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, None) or []]
        if not header or header[0] != "image":
            raise ReaderError(f"{where(path, 1)}: the first column must be 'image', got {header[:1]}")
        au_columns, extra = {}, {}
        for j, name in enumerate(header[1:], start=1):
            if name in _OPTIONAL:
                extra[name] = j
                continue
            try:
                au = au_name(name)
            except KeyError as e:
                raise ReaderError(f"{where(path, 1)}: column {name!r} is neither an AU nor one of "
                                  f"{_OPTIONAL}: {e.args[0]}") from None
            if au in au_columns:
                raise ReaderError(f"{where(path, 1)}: two columns name {au}")
            au_columns[au] = j
        rows = []  # (line, cells, {au: float})
        for row in reader:
            loc = where(path, reader.line_num)
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ReaderError(f"{loc}: expected {len(header)} columns, got {len(row)}")
            numbers = {au: parse_float(row[j], loc, au) for au, j in au_columns.items()
                       if row[j].strip()}
            rows.append((reader.line_num, row, numbers))
    values = cfg.values
    if values == "auto":
        binary = all(v in (0.0, 1.0) for _, _, numbers in rows for v in numbers.values())
        values = "occurrence" if binary else "intensity"
    records = Records()
    for line, row, numbers in rows:
        loc = where(path, line)
        aus, intensities = {}, {}
        for au, v in numbers.items():
            if values == "occurrence":
                if v not in (0.0, 1.0):
                    raise ReaderError(f"{loc}: {au} occurrence must be 0 or 1, got {row[au_columns[au]]!r}")
                aus[au] = int(v)
            else:
                if not 0.0 <= v <= 5.0:
                    raise ReaderError(f"{loc}: {au} intensity must be in [0, 5], got {v}")
                intensities[au] = v
                aus[au] = int(v >= cfg.occurrence_threshold)
        emotion = None
        if "emotion" in extra and row[extra["emotion"]].strip():
            try:
                emotion = emotion_name(row[extra["emotion"]])
            except KeyError as e:
                raise ReaderError(f"{loc}: {e.args[0]}") from None
        if not aus and emotion is None:
            raise ReaderError(f"{loc}: row labels nothing (no AU value and no emotion)")
        image = row[0].strip()
        if not image:
            raise ReaderError(f"{loc}: empty image column")
        subject = row[extra["subject"]].strip() if "subject" in extra else ""
        split = row[extra["split"]].strip() if "split" in extra else ""
        records.append(check_record(Record(
            id=f"{cfg.source}/{image}", image=image, source=cfg.source, split=split or cfg.default_split,
            subject=subject or None,
            aus=aus, intensities=intensities, emotion=emotion), loc))
    check_unique_ids(records, str(path))
    return records.summary(cfg.source, root)
