"""Subject-exclusive folds: the BP4D and DISFA 3-fold protocols, fold files, and splitting.

The subject lists are the partition used by JAA-Net (Shao et al., ECCV 2018) and reused by
ME-GraphAU (Luo et al., IJCAI 2022; `tool/BP4D_image_label_process.py`,
`tool/DISFA_image_label_process.py`, README "BP4D_Sequence_split" / "DISFA_Sequence_split"),
checked there and in other public copies. Those repos call a *training* configuration "fold k"
(fold1 = train on parts 1+2, test on part 3). Here fold k is simply the k-th subject part, and
`split_by_fold(records, protocol, test_fold=k)` holds part k out. Exp-BLIP's BP4D test set
(13 subjects) is part 3.

A fold file is JSON: {"dataset": "bp4d", "citation": "...", "folds": [[subjects], ...]}.
`read_folds` raises on a subject listed twice, or, when the dataset has a literal protocol here,
on a subject that dataset does not have. `split_by_fold` raises on records whose subject is
missing or in no fold, so no frame silently lands in neither split.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from synthesis.readers.common import ReaderError
from synthesis.records import Record


class FoldError(ReaderError):
    """Folds that are not subject-exclusive, name unknown subjects, or cannot split records."""


@dataclass
class FoldProtocol:
    dataset: str
    folds: list[list[str]]  # subject ids of each part; part k is held out by test_fold=k
    citation: str = ""

    @property
    def subjects(self) -> set[str]:
        return {s for fold in self.folds for s in fold}


BP4D_FOLDS = FoldProtocol(
    dataset="bp4d",
    folds=[
        ["F001", "M007", "F018", "F008", "F002", "M004", "F010", "F009", "M012", "M001", "F016",
         "M014", "F023", "M008"],
        ["M011", "F003", "M010", "M002", "F005", "F022", "M018", "M017", "F013", "M016", "F020",
         "F011", "M013", "M005"],
        ["F007", "F015", "F006", "F019", "M006", "M009", "F012", "M003", "F004", "F021", "F017",
         "M015", "F014"],
    ],
    citation="JAA-Net (Shao et al., ECCV 2018) partition as listed in ME-GraphAU "
             "(Luo et al., IJCAI 2022) tool/BP4D_image_label_process.py",
)

DISFA_FOLDS = FoldProtocol(
    dataset="disfa",
    folds=[
        ["SN002", "SN010", "SN001", "SN026", "SN027", "SN032", "SN030", "SN009", "SN016"],
        ["SN013", "SN018", "SN011", "SN028", "SN012", "SN006", "SN031", "SN021", "SN024"],
        ["SN003", "SN029", "SN023", "SN025", "SN008", "SN005", "SN007", "SN017", "SN004"],
    ],
    citation="JAA-Net (Shao et al., ECCV 2018) partition as listed in ME-GraphAU "
             "(Luo et al., IJCAI 2022) tool/DISFA_image_label_process.py",
)

PROTOCOLS: dict[str, FoldProtocol] = {"bp4d": BP4D_FOLDS, "disfa": DISFA_FOLDS}


@dataclass
class Split:
    train: list[Record]
    test: list[Record]


def check_folds(protocol: FoldProtocol, known_subjects: set[str] | None = None,
                where: str = "folds") -> None:
    """Raise FoldError unless every subject is in exactly one fold (and known, if given)."""
    if not protocol.folds or any(not fold for fold in protocol.folds):
        raise FoldError(f"{where}: folds must be a non-empty list of non-empty subject lists")
    owner: dict[str, int] = {}
    for k, fold in enumerate(protocol.folds, start=1):
        for s in fold:
            if not isinstance(s, str) or not s:
                raise FoldError(f"{where}: fold {k} has a subject that is not a non-empty string: {s!r}")
            if s in owner:
                places = f"twice in fold {k}" if owner[s] == k else f"in folds {owner[s]} and {k}"
                raise FoldError(f"{where}: subject {s!r} appears {places}")
            owner[s] = k
    if known_subjects is not None:
        unknown = sorted(set(owner) - known_subjects)
        if unknown:
            raise FoldError(f"{where}: unknown subject(s) {unknown} for dataset {protocol.dataset!r}")


def write_folds(path: Path, protocol: FoldProtocol) -> None:
    check_folds(protocol, where=str(path))
    Path(path).write_text(json.dumps(dataclasses.asdict(protocol), indent=1) + "\n")


def read_folds(path: Path, known_subjects: set[str] | None = None) -> FoldProtocol:
    """Read a fold file. Subjects are checked against `known_subjects` when given, otherwise
    against the literal protocol of the same dataset when there is one (bp4d, disfa)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FoldError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(d, dict) or set(d) - {"dataset", "folds", "citation"} or "folds" not in d \
            or "dataset" not in d:
        raise FoldError(f"{path}: expected an object with keys dataset, folds (and citation)")
    if not isinstance(d["folds"], list) or not all(isinstance(f, list) for f in d["folds"]):
        raise FoldError(f"{path}: folds must be a list of subject lists")
    protocol = FoldProtocol(dataset=d["dataset"], folds=d["folds"], citation=d.get("citation", ""))
    if known_subjects is None and protocol.dataset in PROTOCOLS:
        known_subjects = PROTOCOLS[protocol.dataset].subjects
    check_folds(protocol, known_subjects, where=str(path))
    return protocol


def split_by_subjects(records: Sequence[Record], test_subjects: Sequence[str]) -> Split:
    """Records of `test_subjects` -> test, all others -> train (split fields set accordingly)."""
    test_set = set(test_subjects)
    missing = [r.id for r in records if r.subject is None]
    if missing:
        raise FoldError(f"records without a subject cannot be split by subject: {missing[:5]}")
    present = {r.subject for r in records}
    absent = sorted(test_set - present)
    if absent:
        raise FoldError(f"test subject(s) {absent} have no records")
    return _assign(records, lambda i, r: r.subject in test_set)


def split_by_fold(records: Sequence[Record], protocol: FoldProtocol, test_fold: int) -> Split:
    """Hold out fold `test_fold` (1-based); train on the others. Every record's subject must be
    in some fold."""
    check_folds(protocol)
    if not 1 <= test_fold <= len(protocol.folds):
        raise FoldError(f"test_fold must be 1..{len(protocol.folds)}, got {test_fold}")
    known = protocol.subjects
    stray = sorted({str(r.subject) for r in records if r.subject not in known})
    if stray:
        raise FoldError(f"subject(s) {stray} of the records are in no fold of {protocol.dataset!r}")
    test_set = set(protocol.folds[test_fold - 1])
    return _assign(records, lambda i, r: r.subject in test_set)


def random_split(records: Sequence[Record], test_fraction: float, seed: int = 0) -> Split:
    """A seeded random image-level split (Exp-BLIP's RAF-AU / EmotioNet protocol)."""
    if not 0.0 < test_fraction < 1.0:
        raise FoldError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test = round(len(records) * test_fraction)
    test_idx = set(order[:n_test])
    return _assign(records, lambda i, r: i in test_idx)


def _assign(records: Sequence[Record], is_test) -> Split:
    """Copies of the records with split set to "train" / "test" by `is_test(index, record)`."""
    split = Split(train=[], test=[])
    for i, r in enumerate(records):
        if is_test(i, r):
            split.test.append(dataclasses.replace(r, split="test"))
        else:
            split.train.append(dataclasses.replace(r, split="train"))
    return split
