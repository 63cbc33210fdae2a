"""Shared pieces of the dataset readers: errors with file:line, AU-set checks, drop counting, and
the Exp-BLIP video frame sampling.

Frame sampling implements Exp-BLIP supplement §2: for
BP4D, DISFA and GFT, "take 1 of every 10 frames, plus every frame whose AU label vector differs
from the previous frame". We read "previous" as the previous frame of the same video in file
order (not the previous *kept* frame), and the AU vector as the `aus` dict of the AUs the reader
was asked for (occurrence only; intensity changes that keep occurrence do not count).

Nothing is dropped silently: every reader returns a `Records` list whose `dropped` counter names
each documented category (e.g. "affectnet: expression 8 (none)") and logs it once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from expvl.vocab.facs import au_name
from expvl.vocab.records import Record, RecordError

log = logging.getLogger("expvl.synthesis.readers")


class ReaderError(ValueError):
    """A label file that does not follow the layout a reader expects; the message starts with
    `path:line:` (or `path:` for whole-file problems)."""


def where(path: Path | str, line: int | None = None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def label_pairs(path: Path, missing: str, form: str, sep: str | None = None
                ) -> Iterator[tuple[int, str, str, str]]:
    """(line number, "file:line", first field, second field) of every non-blank line of a two-field
    text label file (a BOM is skipped; fields split on `sep`, whitespace by default). A missing file
    raises saying `missing`, a line of another shape raises showing the expected `form`."""
    if not path.is_file():
        raise ReaderError(f"{where(path)}: {missing}")
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            loc = where(path, line_no)
            parts = text.split(sep)
            if len(parts) != 2:
                raise ReaderError(f"{loc}: expected '{form}', got {text!r}")
            yield line_no, loc, parts[0], parts[1]


class Records(list):
    """A plain `list[Record]` that also carries the counts of what was left out, by category.

    `dropped` maps a human-readable category ("rafau: AU outside the FACS table (AU32)") to a
    count. Readers fill it through `drop`; `summary` logs it once at the end of a read.
    """

    def __init__(self, items: Iterable[Record] = (), dropped: Counter | None = None):
        super().__init__(items)
        self.dropped: Counter = Counter(dropped or {})

    def drop(self, category: str, n: int = 1) -> None:
        self.dropped[category] += n

    def summary(self, source: str, root: Path | str) -> Records:
        log.info("%s: read %d records from %s", source, len(self), root)
        for category, n in sorted(self.dropped.items()):
            log.info("%s: left out %d (%s)", source, n, category)
        return self


def resolve_aus(aus: Sequence[str | int], what: str) -> tuple[str, ...]:
    """Normalise a requested AU list ("1", "AU01", 12) to table names; unknown AUs raise."""
    out = []
    for a in aus:
        try:
            out.append(au_name(a))
        except KeyError as e:
            raise ReaderError(f"{what}: {e.args[0]}") from None
    if len(set(out)) != len(out):
        raise ReaderError(f"{what}: duplicate AUs in {list(aus)}")
    return tuple(out)


def header_au(name: str) -> str | None:
    """The table AU a column header names ("1", "AU01", "au 12"), or None for anything else."""
    try:
        return au_name(name)
    except KeyError:
        return None


def parse_int(text: str, loc: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ReaderError(f"{loc}: {what} must be an integer, got {text!r}") from None


def parse_float(text: str, loc: str, what: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ReaderError(f"{loc}: {what} must be a number, got {text!r}") from None


def format_image(template: str, loc: str, **fields) -> str:
    """Fill an image-path template such as "img/{subject}/{task}/{frame}.jpg"."""
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ReaderError(f"{loc}: image template {template!r} cannot be filled from fields "
                          f"{sorted(fields)} ({e})") from None


def check_record(record: Record, loc: str) -> Record:
    try:
        return record.validate()
    except RecordError as e:
        raise ReaderError(f"{loc}: {e}") from None


def check_unique_ids(records: Sequence[Record], source: str) -> None:
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise ReaderError(f"{source}: two records share the id {r.id!r} (duplicate row?)")
        seen.add(r.id)


def sample_video_frames(frames: Sequence[Record], every: int = 10) -> list[Record]:
    """Exp-BLIP frame sampling for one video, frames in temporal order.

    Keeps frame i when i % every == 0 (1 of every `every` frames, the first included) or when its
    AU vector differs from frame i-1's. Returns the kept frames in order.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    kept = []
    for i, frame in enumerate(frames):
        if i % every == 0 or frame.aus != frames[i - 1].aus:
            kept.append(frame)
    return kept


def add_videos(videos: dict[str, list[Record]], records: Records, *,
               sample_every: int | None = None) -> None:
    """Append every video's frames to `records`: all of them (sample_every None), or those that
    Exp-BLIP's frame sampling keeps (`sample_video_frames`), the rest counted as dropped."""
    for frames in videos.values():
        if sample_every is None:
            records.extend(frames)
            continue
        kept = sample_video_frames(frames, sample_every)
        records.extend(kept)
        if len(kept) < len(frames):
            records.drop(f"not kept by Exp-BLIP frame sampling (1 in {sample_every} + AU changes)",
                         len(frames) - len(kept))


def occurrence_value(text: str, loc: str, au: str, unannotated: frozenset[int]) -> int | None:
    """Parse a 0/1 occurrence cell; values in `unannotated` (BP4D/GFT use 9) mean "not coded"."""
    v = parse_int(text, loc, f"{au} occurrence")
    if v in unannotated:
        return None
    if v not in (0, 1):
        raise ReaderError(f"{loc}: {au} occurrence must be 0, 1 or one of {sorted(unannotated)} "
                          f"(not coded), got {v}")
    return v
