"""Tiny dataset folders in each reader's own layout, with real (random) images at the paths the reader gives.

`write_reader_dataset(source, root)` writes the label files of one reader (BP4D, DISFA, GFT, RAF-AU,
EmotioNet, AffectNet, RAF-DB, RAF-DB compound, generic CSV) for a few subjects / images, reads them back
with the reader to learn the image paths, and draws a small random RGB image at each; it returns the
`train.py` overrides that point the embedded default at it (`synthesis.source=...`, the split).
"""

import random
from pathlib import Path

import numpy as np
from PIL import Image

from expvl.synthesis.readers import READERS
from expvl.vocab.facs import DATASET_AUS
from tests.helpers.datasets import BP4D_HEADER, bp4d_row, write_disfa, write_file

EMOTIONS_RAFDB = range(1, 8)  # RAF-DB basic labels 1..7
SUBJECTS = {"bp4d": [f"F{i:03d}" for i in range(1, 9)], "disfa": [f"SN{i:03d}" for i in range(1, 9)],
            "gft": [f"{i:03d}A" for i in range(1, 9)], "csv": [f"s{i}" for i in range(8)]}


def _bp4d(root: Path, rng: random.Random) -> None:
    for s in SUBJECTS["bp4d"]:
        aus = [f"AU{a}" for a in BP4D_HEADER.split(",")[1:] if a != "3"]
        rows = [bp4d_row(f, on=rng.sample(aus, 3)) for f in range(1, 5)]
        write_file(root / f"AUCoding/AU_OCC/{s}_T1.csv", BP4D_HEADER + "\n" + "\n".join(rows) + "\n")


def _disfa(root: Path, rng: random.Random) -> None:
    for s in SUBJECTS["disfa"]:
        write_disfa(root, s, {int(a[2:]): [rng.choice([0, 0, 3]) for _ in range(4)] for a in DATASET_AUS["disfa12"]})


def _gft(root: Path, rng: random.Random) -> None:
    header = "frame," + ",".join(DATASET_AUS["gft"])
    for s in SUBJECTS["gft"]:
        rows = [f"{f}," + ",".join(rng.choice("001") for _ in DATASET_AUS["gft"]) for f in range(1, 5)]
        write_file(root / f"labels/{s}.csv", header + "\n" + "\n".join(rows) + "\n")


def _rafau(root: Path, rng: random.Random) -> None:
    codes = ["1", "2", "4", "6", "12", "25"]
    write_file(root / "RAFAU_label.txt", "".join(f"{i:04d}.jpg {'+'.join(rng.sample(codes, 2))}\n" for i in range(32)))


def _emotionet(root: Path, rng: random.Random) -> None:
    aus = list(DATASET_AUS["emotionet"])
    rows = [f"faces/img{i}.jpg," + ",".join(rng.choice("01") for _ in aus) for i in range(32)]
    write_file(root / "emotionet_manual.csv", "URL," + ",".join(aus) + "\n" + "\n".join(rows) + "\n")


def _affectnet(root: Path, rng: random.Random) -> None:
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
    row = (lambda name: f"{name},0,0,64,64,1.0;2.0,{rng.randrange(0, 8)},0.1,0.2")
    lists = root / "Manually_Annotated_file_lists"
    write_file(lists / "training.csv", header + "\n" + "\n".join(row(f"1/{i}.jpg") for i in range(28)) + "\n")
    write_file(lists / "validation.csv", header + "\n" + "\n".join(row(f"2/{i}.jpg") for i in range(8)) + "\n")


def _rafdb(root: Path, rng: random.Random) -> None:
    lines = [f"train_{i:05d}.jpg {rng.choice(EMOTIONS_RAFDB)}" for i in range(28)]
    lines += [f"test_{i:04d}.jpg {rng.choice(EMOTIONS_RAFDB)}" for i in range(8)]
    write_file(root / "EmoLabel/list_patition_label.txt", "\n".join(lines) + "\n")


def _rafdb_compound(root: Path, rng: random.Random) -> None:
    lines = [f"train_{i:04d}.jpg {rng.randrange(1, 12)}" for i in range(28)]
    lines += [f"test_{i:04d}.jpg {rng.randrange(1, 12)}" for i in range(8)]
    write_file(root / "EmoLabel/list_patition_label.txt", "\n".join(lines) + "\n")


def _csv(root: Path, rng: random.Random) -> None:
    rows = [f"img/{i}.jpg,{rng.randint(0, 1)},{rng.randint(0, 1)},{rng.randint(0, 1)},"
            f"{rng.choice(['happiness', 'sadness', ''])},{SUBJECTS['csv'][i % 8]}" for i in range(32)]
    write_file(root / "labels.csv", "image,AU1,AU4,AU12,emotion,subject\n" + "\n".join(rows) + "\n")


WRITERS = {"bp4d": _bp4d, "disfa": _disfa, "gft": _gft, "rafau": _rafau, "emotionet": _emotionet,
           "affectnet": _affectnet, "rafdb": _rafdb, "rafdb_compound": _rafdb_compound, "csv": _csv}


def write_reader_dataset(source: str, root: Path, seed: int = 0) -> list[str]:
    """The dataset folder of `source` under `root`, images included; returns the train.py overrides."""
    rng = random.Random(seed)
    WRITERS[source](root, rng)
    records = READERS[source](root)
    noise = np.random.default_rng(seed)
    for r in records:
        path = root / r.image
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    # AffectNet and RAF-DB carry the official train / test partition; the others are split here
    split = [] if source in ("affectnet", "rafdb", "rafdb_compound") else ["synthesis.split.test_fraction=0.25",
                                                                           "synthesis.split.val_fraction=0.2"]
    return [f"synthesis.source={source}", f"synthesis.source_root={root}", *split]
