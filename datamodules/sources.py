"""Where records come from: shard discovery, record reading with a validation policy, and the index.

A dataset folder written by `synthesis/` holds `manifest.json` and JSONL shards:

    {"shards": [{"path": "train-00000.jsonl", "split": "train", "records": 812, ...}, ...], ...}

Shard paths are relative to the folder holding the manifest, and so are the records' image paths
(see vocab/records.py). A plain list of shard paths is accepted too; its records' images are
then resolved against `root` (default: each shard's own folder).

Validation policy (`policy`): "error" (default) raises `ShardError` naming shard and line at the
first malformed line; "skip" drops the line, counts it and logs the count with the first few
locations. Nothing is ever dropped silently. Whitespace-only lines are not records (a trailing
newline is normal JSONL) and are ignored by both the reader and the manifest count check. A record
whose image path leaves the dataset's folders (`..`, or an absolute path elsewhere; the folders are
the manifest's own, its `image_root` and `image_roots`, see vocab/shards.py) is malformed: its image
is never opened.

Integrity, under either policy (the data on disk must be the data that was described): a shard
whose sha256 differs from the manifest's, a shard listed twice, and a record id seen twice in one
index are errors. The hash is taken from the bytes the index parses (no pass of its own) together
with the file's (size, mtime_ns); a stream checks that signature again each time it starts reading
(`ShardIndex.check_unchanged`, one stat per shard), so a shard edited after indexing is named
instead of being read at stale offsets.

`build_index` reads every shard once, validates every record and remembers where each valid one
starts (byte offset) and how many samples it expands to. The stream needs exactly that to deal
samples to (rank, worker) slots in equal numbers and to resume at an exact position; reading it
back is a seek, so memory stays O(records) integers, never O(records) parsed objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from expvl.vocab.records import Record, RecordError
from expvl.vocab.shards import (
    HashedLines,
    file_signature,
    image_outside,
    image_roots,
    listed_shards,
    sha_mismatch,
)

log = logging.getLogger(__name__)

POLICIES = ("error", "skip")
MANIFEST = "manifest.json"


class ShardError(RecordError):
    """A malformed shard line or an inconsistent manifest; the message starts with `path:line:`."""


@dataclass(frozen=True)
class ShardInfo:
    path: Path  # the JSONL file
    root: Path  # folder that relative image paths in its records are resolved against
    split: str | None = None  # from the manifest; None for a plain shard list
    records: int | None = None  # record count promised by the manifest; None if unknown
    sha256: str | None = None  # the manifest's hash of the file; None if unknown
    image_roots: tuple[str, ...] = ()  # folders its records' images may lie in; () = `root` only


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    return policy


def discover_shards(
    source: str | Path | Sequence[str | Path], *, split: str | None = None, root: str | Path | None = None
) -> list[ShardInfo]:
    """Shards of a dataset folder / manifest file (filtered by `split`), or a plain list of shard paths.

    Args:
        source: a dataset folder holding manifest.json, the manifest file itself, or a list of
            .jsonl shard paths (in the order the stream should read them).
        split: keep only manifest shards of this split (None keeps all). Not allowed with a list.
        root: image root for a plain list (default: each shard's folder). Not allowed with a manifest.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        manifest = path / MANIFEST if path.is_dir() else path
        if manifest.suffix == ".jsonl":  # a single shard given as a path, not a manifest
            return discover_shards([manifest], split=split, root=root)
        if root is not None:
            raise ValueError("root is the manifest's folder for a dataset folder; pass root only with a shard list")
        return _manifest_shards(manifest, split)
    if split is not None:
        raise ValueError("split filters manifest shards; a plain shard list has no split information")
    shards, seen = [], set()
    for p in source:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"shard {p} does not exist")
        if p.resolve() in seen:
            raise ShardError(f"shard {p} is listed twice: its records would be read twice")
        seen.add(p.resolve())
        shards.append(ShardInfo(path=p, root=Path(root) if root is not None else p.parent))
    if not shards:
        raise ValueError("empty shard list")
    return shards


def _manifest_shards(manifest: Path, split: str | None) -> list[ShardInfo]:
    if not manifest.is_file():
        raise FileNotFoundError(f"no {MANIFEST} at {manifest}")
    try:
        meta = json.loads(manifest.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{manifest}:{e.lineno}: not valid JSON ({e.msg})") from None
    entries = meta.get("shards") if isinstance(meta, dict) else None
    if not isinstance(entries, list):
        raise ShardError(f"{manifest}: needs a 'shards' list of {{'path', 'split', 'records'}} objects")
    listed_shards(manifest.parent, meta, error=ShardError)
    roots = image_roots(manifest.parent, meta)
    shards = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise ShardError(f"{manifest}: shards[{i}] needs a string 'path', got {e!r}")
        records = e.get("records")
        if records is not None and (not isinstance(records, int) or records < 0):
            raise ShardError(f"{manifest}: shards[{i}].records must be a non-negative int, got {records!r}")
        sha = e.get("sha256")
        if sha is not None and not isinstance(sha, str):
            raise ShardError(f"{manifest}: shards[{i}].sha256 must be a hex string, got {sha!r}")
        path = manifest.parent / e["path"]
        if split is None or e.get("split") == split:
            if not path.is_file():
                raise FileNotFoundError(f"{manifest}: shards[{i}] {path} does not exist")
            shards.append(ShardInfo(path=path, root=manifest.parent, split=e.get("split"), records=records,
                                    sha256=sha, image_roots=roots))
    if not shards:
        splits = sorted({str(e.get("split")) for e in entries if isinstance(e, dict)})
        raise ShardError(f"{manifest}: no shard with split {split!r} (splits present: {splits})")
    return shards


@dataclass
class SkipLog:
    """Counts what a `skip` policy dropped; keeps the first few locations for the log line."""

    what: str  # "malformed record" / "unreadable image"
    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, where: str) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(where)

    def report(self) -> None:
        if self.count:
            log.warning("skipped %d %s(s) (policy 'skip'); first: %s", self.count, self.what, "; ".join(self.first))


def iter_records(shard: ShardInfo, *, policy: str = "error", skipped: SkipLog | None = None,
                 lines: HashedLines | None = None) -> Iterator[tuple[int, int, Record]]:
    """Yields (1-based line number, byte offset, Record) for every valid line of a shard, then checks the
    file against the manifest's sha256 (`lines`, if given, is the reader that hashes it).

    Under policy "skip", malformed lines are counted in `skipped` (the caller logs it).
    """
    check_policy(policy)
    lines = HashedLines(shard.path) if lines is None else lines
    roots = shard.image_roots or image_roots(shard.root, {})
    offset = 0
    for line_no, raw in enumerate(lines, start=1):
        start, offset = offset, offset + len(raw)
        if not raw.strip():
            continue
        try:
            record = Record.from_json(raw.decode("utf-8"))
            outside = image_outside(record.image, shard.root, roots)
            if outside:
                raise RecordError(f"record {record.id!r}: {outside}")
        except (RecordError, UnicodeDecodeError) as e:
            where = f"{shard.path}:{line_no}: {e}"
            if policy == "error":
                raise ShardError(where) from None
            if skipped is not None:
                skipped.add(where)
            continue
        yield line_no, start, record
    mismatch = sha_mismatch(shard.path, shard.sha256, lines.sha256)
    if mismatch:
        raise ShardError(mismatch)


@dataclass
class ShardIndex:
    """Where every valid record of a list of shards starts, and how many samples each yields."""

    shards: list[ShardInfo]
    offsets: list[np.ndarray]  # per shard, (R_s,) int64 byte offset of each valid record
    lines: list[np.ndarray]  # per shard, (R_s,) int64 1-based line number (for messages)
    samples: list[np.ndarray]  # per shard, (R_s,) int64 samples per record (1, or len(expand(record)))
    skipped: SkipLog  # malformed lines dropped under policy "skip"
    lengths: list[np.ndarray] | None = None  # per shard, (samples.sum(),) int64 text length of each
    #   sample in record order (`sample_length`); only when the index was built with lengths=True
    ids: list[np.ndarray] = field(default_factory=list)  # per shard, (R_s,) uint64 `id_key` of each record
    sha256: list[str] = field(default_factory=list)  # per shard, the hash of the bytes indexed
    signatures: list[tuple[int, int]] = field(default_factory=list)  # per shard, (size, mtime_ns) indexed

    @property
    def num_records(self) -> int:
        return sum(len(o) for o in self.offsets)

    def fingerprint(self) -> dict[str, str]:
        """{shard path relative to its root: sha256}: what a run read, for a resume to compare."""
        return {os.path.relpath(s.path, s.root): sha for s, sha in zip(self.shards, self.sha256, strict=True)}

    def check_unchanged(self) -> None:
        """Raise if a shard's (size, mtime_ns) moved since it was indexed: its offsets and hash are stale."""
        for shard, signature in zip(self.shards, self.signatures, strict=True):
            if file_signature(shard.path) != signature:
                raise ShardError(f"{shard.path}: changed after it was indexed and verified; rebuild the stream "
                                 "(restart) so the new contents are checked")

    @property
    def num_samples(self) -> int:
        return int(sum(s.sum() for s in self.samples))


def sample_length(sample: dict) -> int:
    """A sample's text length in characters (its string values summed): the key length grouping sorts by.

    Characters, not tokens: the stream runs before any tokenizer, and the order they induce is the
    same up to ties for the short questions, answers and captions the stages train on."""
    return sum(len(v) for v in sample.values() if isinstance(v, str))


def build_index(
    shards: list[ShardInfo], *, policy: str = "error", expand: Callable[[Record], list[dict]] | None = None,
    lengths: bool = False,
) -> ShardIndex:
    """Reads and validates every shard once. Checks manifest record counts against the files.

    lengths=True also stores every expanded sample's `sample_length` (needs `expand`).

    A manifest count that disagrees with the lines in the file means a truncated or replaced shard,
    which is an error under either policy: the data on disk is not the data that was described.
    """
    if lengths and expand is None:
        raise ValueError("sample lengths need an expand function: records without samples have no text to measure")
    skipped = SkipLog("malformed record")
    offsets, lines, samples, sizes, ids, digests, signatures = [], [], [], [], [], [], []
    for shard in shards:
        before = skipped.count
        o, ln, n, z, keys = [], [], [], [], []
        hashed = HashedLines(shard.path)
        for line_no, start, record in iter_records(shard, policy=policy, skipped=skipped, lines=hashed):
            o.append(start)
            ln.append(line_no)
            keys.append(id_key(record.id))
            if expand is None:
                n.append(1)
                continue
            out = _expanded(expand, record, shard, line_no)
            n.append(len(out))
            if lengths:
                z.extend(sample_length(d) for d in out)
        found = len(o) + skipped.count - before
        if shard.records is not None and found != shard.records:
            raise ShardError(
                f"{shard.path}: the manifest promises {shard.records} records, the file has {found} lines "
                "(truncated or stale shard?)"
            )
        offsets.append(np.asarray(o, dtype=np.int64))
        lines.append(np.asarray(ln, dtype=np.int64))
        samples.append(np.asarray(n, dtype=np.int64))
        sizes.append(np.asarray(z, dtype=np.int64))
        ids.append(np.asarray(keys, dtype=np.uint64))
        digests.append(hashed.sha256)
        signatures.append(hashed.signature)
    duplicate = duplicate_ids(shards, ids)
    if duplicate:
        raise ShardError(duplicate)
    skipped.report()
    return ShardIndex(shards=shards, offsets=offsets, lines=lines, samples=samples, skipped=skipped,
                      lengths=sizes if lengths else None, ids=ids, sha256=digests, signatures=signatures)


def id_key(record_id: str) -> int:
    """A record id as 64 bits (blake2b): the index keeps one integer per record, not its string."""
    return int.from_bytes(hashlib.blake2b(record_id.encode(), digest_size=8).digest(), "little")


def duplicate_ids(shards: list[ShardInfo], ids: list[np.ndarray]) -> str | None:
    """The message for the first record id found twice in `shards` (`ids`: their `id_key`s), else None.

    Only when two keys match are the shards read again, to name the id and both places (and to tell
    a true duplicate from a 64-bit collision, which is no error)."""
    keys = np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint64)
    uniq, counts = np.unique(keys, return_counts=True)
    twice = set(uniq[counts > 1].tolist())
    if not twice:
        return None
    seen: dict[str, str] = {}  # id -> where it was first read
    for shard in shards:
        for line_no, _, record in iter_records(shard, policy="skip"):
            if id_key(record.id) in twice:
                where = f"{shard.path}:{line_no}" + (f" (split {shard.split!r})" if shard.split else "")
                if record.id in seen:
                    return (f"record id {record.id!r} at {seen[record.id]} and again at {where}: a record is "
                            "read once (a shard listed or copied twice, or one face in two splits)")
                seen[record.id] = where
    return None


def changed_inputs(before: dict[str, str], now: dict[str, str]) -> str | None:
    """What differs between two `ShardIndex.fingerprint`s, in words (the first three shards), else None."""
    changed = [p for p in sorted(before.keys() | now.keys()) if before.get(p) != now.get(p)]
    if not changed:
        return None
    words = [f"{p} is new" if p not in before else f"{p} is gone" if p not in now else
             f"{p} (sha256 {before[p][:16]} then, {now[p][:16]} now)" for p in changed[:3]]
    return "; ".join(words) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")


def _expanded(expand: Callable[[Record], list[dict]], record: Record, shard: ShardInfo, line_no: int) -> list[dict]:
    out = expand(record)
    if not isinstance(out, list) or not all(isinstance(d, dict) for d in out):
        raise TypeError(f"{shard.path}:{line_no}: expand() must return a list of dicts, got {type(out).__name__}")
    return out


class RecordReader:
    """Random access to indexed records by (shard, record number): one seek + one line per read.

    Keeps one open file per shard (a worker seeks back and forth between them); `close()` when done.
    """

    def __init__(self, index: ShardIndex):
        self.index = index
        self._files: dict[int, object] = {}

    def read(self, shard: int, rec: int) -> Record:
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.index.shards[shard].path, "rb")  # noqa: SIM115 closed by close()
        f.seek(int(self.index.offsets[shard][rec]))
        raw = f.readline()
        try:
            return Record.from_json(raw.decode("utf-8"))
        except (RecordError, UnicodeDecodeError) as e:  # the file changed after indexing
            raise ShardError(f"{self.where(shard, rec)}: {e} (shard modified after indexing?)") from None

    def where(self, shard: int, rec: int) -> str:
        return f"{self.index.shards[shard].path}:{int(self.index.lines[shard][rec])}"

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
