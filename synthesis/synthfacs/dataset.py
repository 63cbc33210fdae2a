"""SynthFACS dataset on disk: splits rendered in parallel, cached by config hash, contact sheet.

Layout of `root`:
    synthfacs.json            config, hash, counts, "complete" flag (written first and last)
    images/{split}/{i:06d}.png
    labels_{split}.jsonl      one `vocab.records.Record` per line

Each face's pixels depend only on (cfg, split, index), so the output is byte-identical for any
worker count; workers render contiguous chunks and return their records in order.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

from PIL import Image, ImageDraw

from expvl.synthesis.synthfacs.config import SynthFACSConfig, config_from_dict, config_hash, config_to_dict
from expvl.synthesis.synthfacs.render import render_face
from expvl.synthesis.synthfacs.sample import SPLITS, FaceParams, sample_params
from expvl.vocab.facs import SYNTHFACS_AUS
from expvl.vocab.records import Record

MANIFEST = "synthfacs.json"
CHUNK = 64  # faces per pool task: big enough to amortise IPC, small enough to balance 2 workers


class SynthFACSCacheError(RuntimeError):
    """`root` holds something other than this config's dataset; we never overwrite it."""


def make_record(params: FaceParams, split: str, index: int) -> Record:
    expr = params.expression
    active = set(expr.active)
    n = params.nuisance
    return Record(
        id=f"synthfacs/{split}/{index:06d}", image=f"images/{split}/{index:06d}.png",
        source="synthfacs", split=split, subject=params.identity.id,
        aus={au: int(au in active) for au in SYNTHFACS_AUS},
        intensities={au: float(expr.intensity(au)) for au in SYNTHFACS_AUS if au in active},
        emotion=expr.emotion,
        meta={"seed": params.seed, "sides": {au: list(v) for au, v in expr.sides.items()},
              "pose": {"roll": round(n.roll, 3), "yaw": round(n.yaw, 3), "scale": round(n.scale, 3)}},
    ).validate()


def sample_records(cfg: SynthFACSConfig, split: str, n: int) -> list[Record]:
    """Labels of the first n faces of a split, without rendering (for statistics and tests)."""
    return [make_record(sample_params(cfg, split, i), split, i) for i in range(n)]


def _render_chunk(task: tuple[dict, str, int, int, str]) -> list[str]:
    """Pool worker: render faces [start, stop) of a split into root; return record JSON lines."""
    cfg_dict, split, start, stop, root = task
    cfg = config_from_dict(cfg_dict)
    out_dir = Path(root) / "images" / split
    lines = []
    for i in range(start, stop):
        params = sample_params(cfg, split, i)
        img = render_face(params, cfg.size, cfg.supersample)
        img.save(out_dir / f"{i:06d}.png", optimize=False, compress_level=1)
        lines.append(make_record(params, split, i).to_json())
    return lines


def _split_sizes(cfg: SynthFACSConfig) -> dict[str, int]:
    return {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}


def _write_manifest(root: Path, cfg: SynthFACSConfig, complete: bool) -> None:
    manifest = {"config": config_to_dict(cfg), "hash": config_hash(cfg), "complete": complete,
                "counts": _split_sizes(cfg), "aus": list(SYNTHFACS_AUS)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(root / MANIFEST)


def load_records(root: Path) -> dict[str, list[Record]]:
    out = {}
    for split in SPLITS:
        path = root / f"labels_{split}.jsonl"
        records = []
        with open(path) as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    records.append(Record.from_json(line))
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
        out[split] = records
    return out


def _check_root(root: Path, cfg: SynthFACSConfig) -> bool:
    """True when root already holds this config's complete dataset; raises on a foreign one."""
    manifest = root / MANIFEST
    if manifest.exists():
        found = json.loads(manifest.read_text())
        if found.get("hash") != config_hash(cfg):
            raise SynthFACSCacheError(
                f"{root} holds SynthFACS config hash {found.get('hash')}, not {config_hash(cfg)}; "
                f"use another root or delete it (it is never overwritten)")
        return bool(found.get("complete"))
    if root.exists() and any(root.iterdir()):
        raise SynthFACSCacheError(f"{root} is not empty and has no {MANIFEST}; refusing to render into it")
    return False


def render_dataset(cfg: SynthFACSConfig, root: Path, workers: int | None = None) -> dict[str, list[Record]]:
    """Render (or load from the cache in `root`) the train / val / test splits.

    Args:
        cfg: what to render.
        root: dataset folder; created if missing. Same config hash -> cached records returned;
            another hash, or foreign files -> SynthFACSCacheError.
        workers: processes (None -> cfg.workers; 0 -> os.cpu_count(); 1 -> in-process). The
            pool uses "spawn", so a calling script needs the `if __name__ == "__main__":` guard.
    Returns:
        {"train": [Record, ...], "val": [...], "test": [...]}.
    """
    root = Path(root)
    if _check_root(root, cfg):
        return load_records(root)
    root.mkdir(parents=True, exist_ok=True)
    _write_manifest(root, cfg, complete=False)  # claims root for this hash; a rerun resumes
    workers = cfg.workers if workers is None else workers
    workers = workers or os.cpu_count() or 1
    tasks = []
    for split, n in _split_sizes(cfg).items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        tasks += [(config_to_dict(cfg), split, s, min(s + CHUNK, n), str(root)) for s in range(0, n, CHUNK)]
    if workers == 1 or len(tasks) <= 1:
        results = [_render_chunk(t) for t in tasks]
    else:
        # spawn: safe when the parent already runs torch threads (fork could deadlock)
        with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            results = pool.map(_render_chunk, tasks, chunksize=1)
    lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    for task, chunk in zip(tasks, results):
        lines[task[1]] += chunk
    for split in SPLITS:
        tmp = root / f"labels_{split}.jsonl.tmp"
        tmp.write_text("".join(line + "\n" for line in lines[split]))
        tmp.replace(root / f"labels_{split}.jsonl")
    _write_manifest(root, cfg, complete=True)
    return load_records(root)


def label_text(rec: Record) -> str:
    """Emotion, subject and the present AUs, each with its intensity where the labels have one (a dataset
    coded for occurrence only, or a CSV of 0/1 labels, has none)."""
    aus = " ".join(f"{au[2:]}:{rec.intensities[au]:.0f}" if au in rec.intensities else au[2:]
                   for au in rec.positive_aus)
    return f"{rec.emotion or '-'} {rec.subject or ''}\n{aus or 'no AU'}"


def contact_sheet(records: list[Record], root: Path, out_path: Path, n: int = 48, tile: int = 128,
                  cols: int = 8) -> Path:
    """A PNG grid of the first n faces, each with its emotion, identity and AUs (:intensity when known)."""
    records = records[:n]
    rows = (len(records) + cols - 1) // cols
    text_h = 34
    sheet = Image.new("RGB", (cols * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, rec in enumerate(records):
        x, y = (k % cols) * tile, (k // cols) * (tile + text_h)
        img = Image.open(Path(root) / rec.image).convert("RGB").resize((tile, tile), Image.NEAREST)
        sheet.paste(img, (x, y))
        words, line, lines = label_text(rec).replace("\n", " \n ").split(" "), "", []
        for w in words:  # wrap to the tile width
            if w == "\n" or draw.textlength(line + " " + w) > tile - 4:
                lines.append(line)
                line = "" if w == "\n" else w
            else:
                line = (line + " " + w).strip()
        lines.append(line)
        draw.multiline_text((x + 2, y + tile + 1), "\n".join(lines[:3]), fill="black", spacing=0)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path)
    return out_path
