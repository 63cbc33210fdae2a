"""Sharded JSONL output with a manifest: atomic writes, config hashes, resumable reruns.

A shard set is a folder holding `manifest.json` and `shards/<split>-<NNNNN>.jsonl`:

    {"format": 1, "config_hash": "3f2a...", "seed": 0, "complete": true,
     "image_root": ".",                 folder record image paths are relative to, from here
     "image_roots": ["/data/BP4D"],     other folders records may point into (a reader's source_root)
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

Reading a shard set back checks that it is the data the manifest describes, at no extra pass over
the files: each shard's sha256 is computed from the bytes being parsed (`HashedLines`) and compared
at its end; a shard listed twice, a record id in two places (within or across splits) and an image
path that leaves the allowed folders (`image_outside`: `..` or an absolute path elsewhere) are
refused. The allowed folders are the set's own, the one `image_root` names and `image_roots`;
symlinks inside them are followed (the data owner put them there), only the written path is judged.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
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
                 image_roots: Sequence[str | Path] = (), extra: dict | None = None, complete: bool = True) -> dict:
    """Validate and write every split as shards of `shard_size` records; return the manifest.

    `image_roots`: folders outside the set that its records' images may lie in (absolute paths).
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
    if image_roots:
        manifest["image_roots"] = [str(Path(p).resolve()) for p in image_roots]
    records_by_split = {split: list(records) for split, records in records_by_split.items()}
    check_unique_ids(records_by_split)
    for split, records in records_by_split.items():
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


def check_unique_ids(records_by_split: dict[str, list[Record]]) -> None:
    """Refuse a record id seen twice: within a split it is trained on twice, across splits it leaks
    (a test face that is also a training face)."""
    split_of: dict[str, str] = {}
    for split, records in records_by_split.items():
        for r in records:
            first = split_of.setdefault(r.id, split)
            if first != split:
                raise ShardError(f"record id {r.id!r} is in split {first!r} and in split {split!r}: "
                                 "a record may be in one split only")
        ids = Counter(r.id for r in records)
        dup = [i for i, n in ids.items() if n > 1]
        if dup:
            raise ShardError(f"split {split!r}: duplicate record ids, e.g. {dup[:3]}")


class HashedLines:
    """A file's lines as bytes, hashed on the way through: a shard is checked against its manifest's
    sha256 by the read that parses it, never by a pass of its own. `signature` is the (size, mtime_ns)
    it was opened with: later checks of the same file are a stat, not a rehash."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.signature: tuple[int, int] | None = None
        self._sha = hashlib.sha256()

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            self.signature = file_signature(f.fileno())
            for raw in f:
                self._sha.update(raw)
                yield raw

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


def file_signature(file: str | Path | int) -> tuple[int, int]:
    """(size, mtime_ns) of a path or an open file descriptor."""
    st = os.stat(file)
    return st.st_size, st.st_mtime_ns


def sha_mismatch(path: Path, expected: str | None, actual: str) -> str | None:
    """The message for a shard whose bytes are not the ones its manifest hashed (None if they are or no
    hash was recorded)."""
    if expected is None or expected == actual:
        return None
    return (f"{path}: sha256 {actual[:16]} differs from the manifest's {expected[:16]}: the shard was changed "
            "after it was written (restore it, or rebuild the dataset)")


def listed_shards(folder: Path, manifest: dict, *, error: type[Exception] = ShardError) -> list[dict]:
    """The manifest's shard entries, refusing (with `error`) one listed twice: its records would be read twice."""
    first: dict[str, int] = {}
    entries = manifest.get("shards", [])
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue  # the reader that needs the entry names the problem
        j = first.setdefault(os.path.normpath(entry["path"]), i)
        if j != i:
            raise error(f"{folder / MANIFEST}: shards[{i}] lists {entry['path']!r} again (as shards[{j}]): "
                             "a shard listed twice would be read twice")
    return entries


def _norm(path: str | Path) -> str:
    return os.path.normpath(os.path.abspath(path))


def image_roots(folder: str | Path, manifest: dict) -> tuple[str, ...]:
    """The folders the records of the shard set in `folder` may take images from (normalized, absolute):
    its own (relative paths resolve against it), the one its `image_root` names, and its `image_roots`."""
    roots = [folder, Path(folder) / str(manifest.get("image_root", ".")), *manifest.get("image_roots", [])]
    return tuple(dict.fromkeys(_norm(r) for r in roots))


def image_outside(image: str, base: str | Path, roots: Sequence[str]) -> str | None:
    """None when `image` (absolute, or relative to `base`) lies inside one of `roots` (as `image_roots`
    gives them), else why it is refused. Judged on the path as written, normalized: no symlink is read."""
    path = _norm(os.path.join(base, image))
    if any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        return None
    return (f"image {image!r} lies outside the dataset's folders {list(roots)} (a path may not leave them "
            "with '..' or point elsewhere; a reader's source folder must be in the manifest's image_roots: "
            "rebuild a dataset written before manifests listed it)")


def iter_shard_records(path: str | Path, split: str | None = None) -> Iterator[Record]:
    """Records of one shard file, or of every shard (of `split`, if given) of a shard-set folder.

    Errors name the shard and the line: "shards/train-00000.jsonl line 7: aus[...]". From a folder,
    each shard is also checked against the manifest (sha256, once the shard is read to its end) and
    every image path against the set's folders (`image_outside`).
    """
    path = Path(path)
    if path.is_dir():
        m = read_manifest(path)
        if m is None:
            raise ShardError(f"{path} has no {MANIFEST}")
        splits = [split] if split is not None else list(m["splits"])
        entries, roots = listed_shards(path, m), image_roots(path, m)
        for sp in splits:
            if sp not in m["splits"]:
                raise ShardError(f"{path / MANIFEST}: no split {sp!r} (have {sorted(m['splits'])})")
            for shard in entries:
                if shard["split"] == sp:
                    yield from _shard_records(path / shard["path"], shard.get("sha256"), path, roots)
        return
    yield from _shard_records(path)


def _shard_records(path: Path, sha256: str | None = None, base: Path | None = None,
                   roots: Sequence[str] = ()) -> Iterator[Record]:
    lines = HashedLines(path)
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = Record.from_json(raw.decode("utf-8"))
        except (RecordError, UnicodeDecodeError) as e:
            raise RecordError(f"{path} line {lineno}: {e}") from None
        outside = image_outside(record.image, base, roots) if roots else None
        if outside:
            raise RecordError(f"{path} line {lineno}: record {record.id!r}: {outside}")
        yield record
    mismatch = sha_mismatch(path, sha256, lines.sha256)
    if mismatch:
        raise ShardError(mismatch)


def read_split_records(out_dir: str | Path) -> dict[str, list[Record]]:
    """Every split of a shard set, in manifest order; a record id in two places is refused."""
    m = read_manifest(out_dir)
    if m is None:
        raise ShardError(f"{out_dir} has no {MANIFEST}")
    out = {sp: list(iter_shard_records(out_dir, sp)) for sp in m["splits"]}
    check_unique_ids(out)
    return out
