"""EmotioNet reader: the manually annotated subset (about 21k images, 11 AUs in Exp-BLIP).

The EmotioNet challenge files are distributed on request and we could not check their layout
from public code. ASSUMED layout, a CSV with a header row:

    image,AU1,AU2,AU4,...          first column: image URL or path; then one column per AU
    http://x/y/abc.jpg,1,0,999,... 0 absent, 1 present, 999 not annotated (EmotioNet's
                                   "not coded" value as we understand it)

A URL becomes `<images_dir>/<file name of the URL>` (images downloaded once, kept by name); any
other value is taken as a path relative to root. AU headers may be spelled "AU1", "AU 1", "1".

`EmotioNetConfig.aus` selects the columns read (default facs.DATASET_AUS["emotionet"], the 11 AUs); other columns
are ignored. With `aus=None` every column after the first must name a table AU, else the read
raises naming it. 999 leaves the AU out of `Record.aus` (unannotated); rows with no annotated
requested AU are left out and counted. Records carry split "all" (Exp-BLIP: random split,
`folds.random_split`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from expvl.synthesis.readers.common import (
    ReaderError,
    Records,
    check_record,
    check_unique_ids,
    header_au,
    occurrence_value,
    resolve_aus,
    where,
)
from expvl.vocab.facs import DATASET_AUS, au_name
from expvl.vocab.records import Record

NOT_ANNOTATED = frozenset({999})


def _image_path(value: str, images_dir: str) -> str:
    url = urlparse(value)
    if url.scheme in ("http", "https"):
        return f"{images_dir}/{Path(url.path).name}"
    return value


@dataclass
class EmotioNetConfig:
    """What `read_emotionet` reads (`python -m expvl.synthesis source=emotionet emotionet.<field>=...`)."""

    aus: list[str] | None = field(default_factory=lambda: list(DATASET_AUS["emotionet"]))  # AU columns
    #   read; default the 11 AUs; None reads every column (each must be a table AU)
    label_file: str = "emotionet_manual.csv"  # the CSV, relative to root
    images_dir: str = "images"  # folder (relative to root) of the images whose labels give a URL


def read_emotionet(root: Path, config: EmotioNetConfig | None = None) -> Records:
    """Read EmotioNet manual AU labels (assumed layout, see the module docstring) from `root`
    (image paths relative to it) as `config` (default `EmotioNetConfig()`) says."""
    cfg = config or EmotioNetConfig()
    root = Path(root)
    path = root / cfg.label_file
    if not path.is_file():
        raise ReaderError(f"{where(path)}: EmotioNet label file not found")
    records = Records()
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or len(header) < 2:
            raise ReaderError(f"{where(path, 1)}: expected a header 'image,AU1,AU2,...'")
        if cfg.aus is None:
            columns = {}
            for j, name in enumerate(header[1:], start=1):
                try:
                    columns[au_name(name)] = j
                except KeyError as e:
                    raise ReaderError(f"{where(path, 1)}: column {name!r}: {e.args[0]}") from None
        else:
            wanted = resolve_aus(cfg.aus, "emotionet.aus")
            found = {header_au(name): j for j, name in enumerate(header[1:], start=1)}
            missing = [a for a in wanted if a not in found]
            if missing:
                raise ReaderError(f"{where(path, 1)}: header has no column for {missing}")
            columns = {a: found[a] for a in wanted}
        for row in reader:
            loc = where(path, reader.line_num)
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ReaderError(f"{loc}: expected {len(header)} columns, got {len(row)}")
            if not row[0].strip():
                raise ReaderError(f"{loc}: empty image column")
            values = {}
            for au, j in columns.items():
                v = occurrence_value(row[j], loc, au, NOT_ANNOTATED)
                if v is not None:
                    values[au] = v
            if not values:
                records.drop("emotionet: row with none of the requested AUs annotated (all 999)")
                continue
            image = _image_path(row[0].strip(), cfg.images_dir)
            meta = {"url": row[0].strip()} if image != row[0].strip() else {}
            records.append(check_record(Record(
                id=f"emotionet/{image}", image=image, source="emotionet", split="all",
                aus=values, meta=meta), loc))
    check_unique_ids(records, str(path))
    return records.summary("emotionet", root)
