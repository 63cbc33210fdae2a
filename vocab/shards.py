"""Sharded JSONL output with a manifest: atomic writes, config hashes, resumable reruns.

A shard set is a folder holding `manifest.json` and `shards/<split>-<NNNNN>.jsonl`:

    {"format": 1, "config_hash": "3f2a...", "seed": 0, "complete": true,
     "image_root": ".",                 folder record image paths are relative to, from here
     "shards": [{"path": "shards/train-00000.jsonl", "split": "train", "records": 500,
                 "sha256": "..."}, ...],  paths relative to this folder, splits in order
     "splits": {"train": 800, "val": 100, ...},          records per split
     "counts": {"train": {"vqa": {"q1": 800, ...}, "aus": {"AU1": 120, ...},
                          "q3": {"AU1": {"yes": 60, "no": 61}, ...}, "emotion": {...}}},
     "extra": {...}}                    stage-specific (e.g. LLM stats)

Every record is validated before it is written; each shard and the manifest are written to a
temporary file and moved into place with `os.replace`, so a crash never leaves a half shard
that looks finished. A folder already holding a *different* config's output is never
overwritten. Same config: shards whose bytes already match are kept (resume). Our design; the
official repos read single JSON lists (Exp-BLIP's `ImageTextPairDataset` / `CaptionDataset`,
Exp-VQA's `CaptionDataset`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path

from expvl.vocab.records import Record, RecordError

MANIFEST = "manifest.json"


class ShardError(RuntimeError):
    """Output folder conflicts (another config's output) or unreadable shard sets."""


def config_hash(cfg) -> str:
    """sha256 (16 hex chars) of a dataclass or JSON-able object, key order independent."""
    obj = asdict(cfg) if is_dataclass(cfg) else cfg
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder + os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def is_complete(out_dir: str | Path, cfg_hash: str) -> bool:
    """True when `out_dir` holds a finished shard set of exactly this config."""
    m = read_manifest(out_dir)
    return bool(m and m.get("config_hash") == cfg_hash and m.get("complete"))


def check_owner(out_dir: str | Path, cfg_hash: str) -> None:
    """Raise if `out_dir` holds the output of another config."""
    m = read_manifest(out_dir)
    if m is not None and m.get("config_hash") != cfg_hash:
        raise ShardError(
            f"{Path(out_dir) / MANIFEST} belongs to config {m.get('config_hash')}, this run's config is "
            f"{cfg_hash}; refusing to overwrite it (choose another out_dir or delete the folder)")


def _counts(records: list[Record]) -> dict:
    vqa, aus, emo = Counter(), Counter(), Counter()
    q3: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        aus.update(r.positive_aus)
        if r.emotion is not None:
            emo[r.emotion] += 1
        for p in r.vqa:
            vqa[p.type] += 1
            if p.type == "q3":
                q3[p.au][p.answer] += 1
    return {"vqa": dict(vqa), "aus": dict(aus), "emotion": dict(emo),
            "q3": {au: dict(c) for au, c in sorted(q3.items())}}


def write_shards(out_dir: str | Path, records_by_split: dict[str, Iterable[Record]], *,
                 cfg_hash: str, seed: int, shard_size: int, image_root: str = ".",
                 extra: dict | None = None, complete: bool = True) -> dict:
    """Validate and write every split as shards of `shard_size` records; return the manifest.

    `complete=False` marks output a later rerun must redo (e.g. the LLM spend limit stopped it).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    check_owner(out_dir, cfg_hash)
    old = read_manifest(out_dir) or {}
    old_sha = {s["path"]: s["sha256"] for s in old.get("shards", [])}
    manifest = {"format": 1, "config_hash": cfg_hash, "seed": seed, "complete": False,
                "image_root": image_root, "shards": [], "splits": {}, "counts": {}, "extra": extra or {}}
    for split, records in records_by_split.items():
        records = list(records)
        ids = Counter(r.id for r in records)
        dup = [i for i, n in ids.items() if n > 1]
        if dup:
            raise ShardError(f"split {split!r}: duplicate record ids, e.g. {dup[:3]}")
        for start in range(0, max(len(records), 1), shard_size):
            chunk = records[start:start + shard_size]
            lines = []
            for r in chunk:
                try:
                    r.validate()
                except RecordError as e:
                    raise RecordError(f"record {r.id!r} (split {split!r}): {e}") from None
                lines.append(r.to_json() + "\n")
            data = "".join(lines).encode()
            rel = f"shards/{split}-{start // shard_size:05d}.jsonl"
            sha = hashlib.sha256(data).hexdigest()
            path = out_dir / rel
            if not (old_sha.get(rel) == sha and path.exists() and _sha_file(path) == sha):
                atomic_write(path, data)  # resume: identical shards are left untouched
            manifest["shards"].append({"path": rel, "split": split, "records": len(chunk), "sha256": sha})
        manifest["splits"][split] = len(records)
        manifest["counts"][split] = _counts(records)
    manifest["complete"] = complete
    atomic_write(out_dir / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def _sha_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def iter_shard_records(path: str | Path, split: str | None = None) -> Iterator[Record]:
    """Records of one shard file, or of every shard (of `split`, if given) of a shard-set folder.

    Errors name the shard and the line: "shards/train-00000.jsonl line 7: aus[...]".
    """
    path = Path(path)
    if path.is_dir():
        m = read_manifest(path)
        if m is None:
            raise ShardError(f"{path} has no {MANIFEST}")
        splits = [split] if split is not None else list(m["splits"])
        for sp in splits:
            if sp not in m["splits"]:
                raise ShardError(f"{path / MANIFEST}: no split {sp!r} (have {sorted(m['splits'])})")
            for shard in m["shards"]:
                if shard["split"] == sp:
                    yield from iter_shard_records(path / shard["path"])
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Record.from_json(line)
            except RecordError as e:
                raise RecordError(f"{path} line {lineno}: {e}") from None


def read_split_records(out_dir: str | Path) -> dict[str, list[Record]]:
    """Every split of a shard set, in manifest order."""
    m = read_manifest(out_dir)
    if m is None:
        raise ShardError(f"{out_dir} has no {MANIFEST}")
    return {sp: list(iter_shard_records(out_dir, sp)) for sp in m["splits"]}
