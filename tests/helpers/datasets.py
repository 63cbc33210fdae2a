"""Tiny dataset files written for the tests: dataset-reader label files (BP4D, DISFA) and record shard sets.

Shared by tests/synthesis/test_readers.py and test_synthesis_cli.py (the reader files), and by
tests/datamodules/test_stream.py and test_stream_ddp.py (`make_record`, `write_dataset`).
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from expvl.vocab.records import Record

BP4D_HEADER = "0,1,2,3,4,5,6,7,10,12,14,15,17,23,24"  # "3" is no table AU: ignored


def write_file(path: Path, text: str) -> Path:
    """`text` written to `path`, its folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def bp4d_row(frame, on=(), nine=(), all_nine=False):
    """One AU_OCC row under BP4D_HEADER: the AUs in `on` are 1, those in `nine` (or all) 9 (not coded)."""
    cells = []
    for name in BP4D_HEADER.split(",")[1:]:
        au = f"AU{name}"
        cells.append("9" if all_nine or au in nine else "1" if au in on else "0")
    return f"{frame}," + ",".join(cells)


def write_disfa(tmp_path, subject, intensities_by_au):
    """DISFA's per-AU label files of one subject: {au_id: [intensity per frame]}."""
    for au_id, values in intensities_by_au.items():
        lines = [f"{i + 1},{v}" for i, v in enumerate(values)]
        write_file(tmp_path / f"ActionUnit_Labels/{subject}/{subject}_au{au_id}.txt", "\n".join(lines) + "\n")


def make_record(i: int, split: str = "train", n_vqa: int = 0) -> Record:
    """Record `r{i:04d}` (image images/{i:04d}.png) with `n_vqa` Q3 pairs."""
    d = {
        "id": f"r{i:04d}",
        "image": f"images/{i:04d}.png",
        "source": "synthfacs",
        "split": split,
        "aus": {"AU1": i % 2, "AU12": (i // 2) % 2},
        "emotion": "happiness",
        "captions": {"emotion": "The face shows happiness."},
        "vqa": [{"type": "q3", "question": f"AU12 {j}?", "answer": "yes", "au": "AU12"} for j in range(n_vqa)],
    }
    return Record.from_dict(d)


def write_dataset(root: Path, n: int, shards: int = 1, *, images: bool = False, vqa=lambda i: 0) -> Path:
    """A dataset folder with manifest.json and `shards` JSONL shards (records dealt in contiguous runs)."""
    root.mkdir(parents=True, exist_ok=True)
    entries, bounds = [], np.linspace(0, n, shards + 1).astype(int)
    for s in range(shards):
        name = f"train-{s:05d}.jsonl"
        ids = range(bounds[s], bounds[s + 1])
        (root / name).write_text("".join(make_record(i, n_vqa=vqa(i)).to_json() + "\n" for i in ids))
        entries.append({"path": name, "split": "train", "records": len(ids)})
    (root / "manifest.json").write_text(json.dumps({"shards": entries}))
    if images:
        (root / "images").mkdir(exist_ok=True)
        for i in range(n):
            Image.new("RGB", (6, 5), (i % 256, 0, 0)).save(root / f"images/{i:04d}.png")
    return root
