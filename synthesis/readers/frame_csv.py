"""One video's frame-by-AU occurrence table (the BP4D `AU_OCC` CSV layout, also assumed for GFT).

Layout (checked against ME-GraphAU `tool/BP4D_image_label_process.py`, which reads these files
with `pd.read_csv(header=0, index_col=0, usecols=["0", "1", "2", "4", ...])`):

    0,1,2,4,6,7,...        header: first column is the frame number, the others are AU numbers
    2440,0,0,1,9,0,...     one row per frame; 0 absent, 1 present, 9 not coded

Only the requested AU columns are read; other columns (BP4D's header lists AUs that were not
reliably coded) are ignored. A requested AU missing from the header raises, naming the file.
Headers may spell AUs "1" or "AU01". A value of 9 leaves that AU out of the frame's `aus` dict
(unannotated, not negative, as the record schema defines).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from expvl.synthesis.readers.common import ReaderError, header_au, occurrence_value, parse_int, where

NOT_CODED = frozenset({9})


@dataclass
class FrameRow:
    line: int  # line number in the CSV (1-based, header is line 1)
    frame: int  # frame number as written in the file
    aus: dict[str, int]  # occurrence of the requested AUs that were coded in this frame


def read_frame_csv(path: Path, aus: tuple[str, ...]) -> list[FrameRow]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ReaderError(f"{where(path)}: empty file (expected a header row)")
        columns = {}
        for j, name in enumerate(header[1:], start=1):
            au = header_au(name)
            if au in aus:
                columns[au] = j
        missing = [a for a in aus if a not in columns]
        if missing:
            raise ReaderError(f"{where(path, 1)}: header has no column for {missing} "
                              f"(header: {header[:30]})")
        rows, seen = [], set()
        for row in reader:
            loc = where(path, reader.line_num)
            if not row or all(not c.strip() for c in row):
                continue  # trailing blank line
            if len(row) != len(header):
                raise ReaderError(f"{loc}: expected {len(header)} columns, got {len(row)}")
            frame = parse_int(row[0], loc, "frame number")
            if frame in seen:
                raise ReaderError(f"{loc}: frame {frame} appears twice")
            seen.add(frame)
            values = {}
            for au in aus:
                v = occurrence_value(row[columns[au]], loc, au, NOT_CODED)
                if v is not None:
                    values[au] = v
            rows.append(FrameRow(reader.line_num, frame, values))
    return rows
