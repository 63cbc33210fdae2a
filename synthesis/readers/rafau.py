"""RAF-AU reader: one FACS string per image, e.g. "1+2+L4+R12".

Layout read (the RAF-AU distribution as read by public code, e.g. OpenGraphAU-style
preprocessing that does `line.split(' ')`, `labels.split('+')`, skipping 'null'):

    <root>/RAFAU_label.txt        "<image name> <AU string>" per line, e.g. "0001.jpg 1+2+L4";
                                  the AU string "null" means no AU
    <root>/aligned/0001_aligned.jpg   aligned faces (default `image_template`)

Exp-BLIP (supplement §2): "32 AUs -> only the AUs in Table 1 kept; region prefixes T/B/L/R
removed". So a token is an optional prefix L/R/T/B plus an AU number; the prefix is dropped
(L12+R12 -> AU12). Numeric AUs outside the 27-AU table (e.g. AU32, AU39) are left out and
counted per AU; any other token raises, naming file, line and token.

`aus`: the AUs recorded in `Record.aus`. Default every table AU: a FACS-coded image lists the AUs
present, so an unlisted AU is absent (0), not unannotated. Table AUs not in `aus` are counted
and left out (options: `RAFAUConfig`). Evaluation uses facs.DATASET_AUS["rafau"]. Records carry
split "all"; Exp-BLIP uses a random split (`folds.random_split`, `python -m expvl.synthesis split.*`).
Our assumptions: the aligned-image naming, and that extra whitespace-separated fields do not occur
(they raise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from expvl.synthesis.readers.common import (
    ReaderError,
    Records,
    check_record,
    check_unique_ids,
    format_image,
    label_pairs,
    resolve_aus,
)
from expvl.vocab.facs import AU_NAMES, AUS, au_name
from expvl.vocab.records import Record

_TOKEN = re.compile(r"^(?P<region>[LRTB])?(?P<id>\d+)$", re.IGNORECASE)


def parse_au_string(text: str, loc: str, records: Records) -> set[str]:
    """The table AUs named by a RAF-AU string ("1+2+L4+R12" -> {AU1, AU2, AU4, AU12})."""
    if text.lower() == "null":
        return set()
    found = set()
    for token in text.split("+"):
        m = _TOKEN.match(token.strip())
        if m:
            name = f"AU{int(m['id'])}"
        else:
            try:
                name = au_name(token)  # also accepts "AU12"; else names the bad token
            except KeyError as e:
                raise ReaderError(f"{loc}: bad AU token {token!r} in {text!r}: {e.args[0]}") from None
        if name not in AUS:
            records.drop(f"rafau: {name} is outside the FACS table of Exp-BLIP")
            continue
        found.add(name)
    return found


@dataclass
class RAFAUConfig:
    """What `read_rafau` reads (`python -m expvl.synthesis source=rafau rafau.<field>=...`)."""

    aus: list[str] = field(default_factory=lambda: list(AU_NAMES))  # AUs recorded per image (0/1);
    #   default all 27 table AUs (evaluation uses facs.DATASET_AUS["rafau"])
    label_file: str = "RAFAU_label.txt"  # the label list, relative to root
    image_template: str = "aligned/{stem}_aligned.jpg"  # image path relative to root; fields name
    #   ("0001.jpg"), stem ("0001")


def read_rafau(root: Path, config: RAFAUConfig | None = None) -> Records:
    """Read RAF-AU labels from `root` (image paths relative to it) as `config` (default
    `RAFAUConfig()`) says."""
    cfg = config or RAFAUConfig()
    root = Path(root)
    aus = resolve_aus(cfg.aus, "rafau.aus")
    path = root / cfg.label_file
    records = Records()
    for _, loc, name, au_string in label_pairs(path, "RAF-AU label file not found", "<image> <AU string>"):
        present = parse_au_string(au_string, loc, records)
        for au in sorted(present - set(aus)):
            records.drop(f"rafau: {au} present but not requested")
        stem = Path(name).stem
        records.append(check_record(Record(
            id=f"rafau/{stem}", image=format_image(cfg.image_template, loc, name=name, stem=stem),
            source="rafau", split="all", aus={au: int(au in present) for au in aus},
            meta={"au_string": au_string}), loc))
    check_unique_ids(records, str(path))
    return records.summary("rafau", root)
