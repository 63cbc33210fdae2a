"""RAF-DB readers: the basic (7 emotions) and compound (11 emotion pairs) parts.

Layout read (the RAF-DB README and public loaders, e.g. `pd.read_csv(
'EmoLabel/list_patition_label.txt', sep=' ', names=['name', 'label'])` and images at
`Image/aligned/<stem>_aligned.jpg`); the root is the `basic/` or `compound/` folder:

    <root>/EmoLabel/list_patition_label.txt   "<name> <label>" per line, e.g. "train_00001.jpg 5"
                                              (the file name's misspelling is RAF-DB's)
    <root>/Image/aligned/train_00001_aligned.jpg

The split is the name's prefix ("train_" / "test_"), the official partition; any other prefix
raises. Basic labels: 1 surprise, 2 fear, 3 disgust, 4 happiness, 5 sadness, 6 anger, 7 neutral.
Compound labels (RAF-DB README): 1 happily surprised, 2 happily disgusted, 3 sadly fearful,
4 sadly angry, 5 sadly surprised, 6 sadly disgusted, 7 fearfully angry, 8 fearfully surprised,
9 angrily surprised, 10 angrily disgusted, 11 disgustedly surprised. A compound record has
emotion None and meta {"compound": "happily surprised", "emotions": ["happiness", "surprise"]}
(the emotion caption merges the two: "The face shows happiness and surprise."). Exp-BLIP's
3,162 / 792 compound train/test counts match the official partition. Our assumption: the
aligned-image naming (`RAFDBConfig.image_template`; fields name, stem).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from expvl.synthesis.readers.common import (
    ReaderError,
    Records,
    check_record,
    check_unique_ids,
    format_image,
    label_pairs,
    parse_int,
)
from expvl.vocab.records import Record

BASIC_LABELS = {1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness", 6: "anger",
                7: "neutral"}
COMPOUND_LABELS = {
    1: ("happily surprised", ("happiness", "surprise")),
    2: ("happily disgusted", ("happiness", "disgust")),
    3: ("sadly fearful", ("sadness", "fear")),
    4: ("sadly angry", ("sadness", "anger")),
    5: ("sadly surprised", ("sadness", "surprise")),
    6: ("sadly disgusted", ("sadness", "disgust")),
    7: ("fearfully angry", ("fear", "anger")),
    8: ("fearfully surprised", ("fear", "surprise")),
    9: ("angrily surprised", ("anger", "surprise")),
    10: ("angrily disgusted", ("anger", "disgust")),
    11: ("disgustedly surprised", ("disgust", "surprise")),
}


def _read_list(path: Path, n_labels: int):
    """[(loc, name, split, label)] of a list_patition_label.txt file."""
    rows = []
    for _, loc, name, label_text in label_pairs(path, "RAF-DB label list not found", "<image> <label>"):
        prefix = name.split("_", 1)[0]
        if prefix not in ("train", "test"):
            raise ReaderError(f"{loc}: image name {name!r} does not start with train_ or test_")
        label = parse_int(label_text, loc, "label")
        if not 1 <= label <= n_labels:
            raise ReaderError(f"{loc}: label must be 1..{n_labels}, got {label}")
        rows.append((loc, name, prefix, label))
    return rows


@dataclass
class RAFDBConfig:
    """What `read_rafdb` / `read_rafdb_compound` read (`python -m expvl.synthesis source=rafdb
    rafdb.<field>=...`, `source=rafdb_compound rafdb_compound.<field>=...`)."""

    label_file: str = "EmoLabel/list_patition_label.txt"  # the label list, relative to root
    image_template: str = "Image/aligned/{stem}_aligned.jpg"  # image path relative to root; fields
    #   name ("train_00001.jpg"), stem ("train_00001")


def read_rafdb(root: Path, config: RAFDBConfig | None = None) -> Records:
    """Read RAF-DB basic emotion labels; root is the `basic/` folder."""
    cfg = config or RAFDBConfig()
    root = Path(root)
    records = Records()
    for loc, name, split, label in _read_list(root / cfg.label_file, len(BASIC_LABELS)):
        stem = Path(name).stem
        records.append(check_record(Record(
            id=f"rafdb/{stem}", image=format_image(cfg.image_template, loc, name=name, stem=stem),
            source="rafdb", split=split, emotion=BASIC_LABELS[label]), loc))
    check_unique_ids(records, str(root / cfg.label_file))
    return records.summary("rafdb", root)


def read_rafdb_compound(root: Path, config: RAFDBConfig | None = None) -> Records:
    """Read RAF-DB compound emotion labels; root is the `compound/` folder."""
    cfg = config or RAFDBConfig()
    root = Path(root)
    records = Records()
    for loc, name, split, label in _read_list(root / cfg.label_file, len(COMPOUND_LABELS)):
        stem = Path(name).stem
        compound, pair = COMPOUND_LABELS[label]
        records.append(check_record(Record(
            id=f"rafdb_compound/{stem}", image=format_image(cfg.image_template, loc, name=name, stem=stem),
            source="rafdb_compound", split=split, emotion=None,
            meta={"compound": compound, "emotions": list(pair)}), loc))
    check_unique_ids(records, str(root / cfg.label_file))
    return records.summary("rafdb_compound", root)
