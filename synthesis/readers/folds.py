"""Subject-exclusive folds: the BP4D and DISFA 3-fold protocols, fold files, and splitting.

The subject lists are the partition used by JAA-Net (Shao et al., ECCV 2018) and reused by
ME-GraphAU (Luo et al., IJCAI 2022; `tool/BP4D_image_label_process.py`,
`tool/DISFA_image_label_process.py`, README "BP4D_Sequence_split" / "DISFA_Sequence_split"),
checked there and in other public copies. Those repos call a *training* configuration "fold k"
(fold1 = train on parts 1+2, test on part 3). Here fold k is simply the k-th subject part, and
`split_by_fold(records, protocol, test_fold=k)` holds part k out. Exp-BLIP's BP4D test set
(13 subjects) is part 3.

`split_records` is what `python -m expvl.synthesis split.*` runs (`SplitConfig`): a seeded train / val /
test split, by subject whenever the records carry subjects (BP4D, DISFA, GFT: no subject in two
splits), by image otherwise (RAF-AU, EmotioNet: Exp-BLIP's random split); the test subjects can
also be a fold of a protocol. Draws are seeded and do not depend on the order of the records.

A fold file is JSON: {"dataset": "bp4d", "citation": "...", "folds": [[subjects], ...]}.
`read_folds` raises on a subject listed twice, or, when the dataset has a literal protocol here,
on a subject that dataset does not have. `split_by_fold` raises on records whose subject is
missing or in no fold, so no frame silently lands in neither split.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from expvl.synthesis.readers.common import ReaderError
from expvl.vocab.records import Record


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
    val: list[Record] = field(default_factory=list)  # empty unless a val share was asked for

    def by_name(self) -> dict[str, list[Record]]:
        """The non-empty splits by name: "train", "val", "test"."""
        return {name: recs for name, recs in (("train", self.train), ("val", self.val), ("test", self.test))
                if recs}


@dataclass
class SplitConfig:
    """`python -m expvl.synthesis split.*`: how reader records with split "all" become train / val / test.

    By subject when the records carry subjects, by image when none does. Records a reader already
    placed (AffectNet, RAF-DB: the official partition) keep their split.
    """

    test_fraction: float = 0.0  # share of the subjects (of the images, when no record has a subject)
    #                             drawn for test
    val_fraction: float = 0.0  # share of the subjects (images) drawn for val from those not in test
    fold_protocol: str = ""  # "bp4d" | "disfa" (the partitions above) | a fold file (JSON): test = the
    #                          subjects of fold `test_fold` instead of a test_fraction draw
    test_fold: int = 0  # 1-based fold held out as test; with fold_protocol

    @property
    def enabled(self) -> bool:
        return self.test_fraction > 0 or self.val_fraction > 0 or bool(self.fold_protocol)

    def validate(self) -> None:
        for name in ("test_fraction", "val_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FoldError(f"split.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.test_fraction + self.val_fraction >= 1.0:
            raise FoldError(f"split.test_fraction + split.val_fraction must be < 1 (some records train), "
                            f"got {self.test_fraction} + {self.val_fraction}")
        if bool(self.fold_protocol) != (self.test_fold != 0):
            raise FoldError("split.fold_protocol and split.test_fold go together: set both or neither")
        if self.fold_protocol and self.test_fraction:
            raise FoldError("split.fold_protocol chooses the test subjects: leave split.test_fraction at 0")

    def hashed_fields(self) -> dict:
        """The fields, plus the folds themselves when they come from a file (which may change)."""
        out = dataclasses.asdict(self)
        if self.fold_protocol and self.fold_protocol not in PROTOCOLS:
            out["folds"] = load_protocol(self.fold_protocol).folds
        return out


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


def load_protocol(name: str) -> FoldProtocol:
    """A literal protocol by dataset name ("bp4d", "disfa"), else a fold file's path."""
    return PROTOCOLS.get(name) or read_folds(Path(name))


def split_by_subjects(records: Sequence[Record], test_subjects: Sequence[str],
                      val_subjects: Sequence[str] = ()) -> Split:
    """Records of `test_subjects` -> test, of `val_subjects` -> val, all others -> train (split
    fields set accordingly)."""
    test_set, val_set = set(test_subjects), set(val_subjects)
    both = sorted(test_set & val_set)
    if both:
        raise FoldError(f"subject(s) {both} are asked for in both test and val")
    absent = sorted((test_set | val_set) - _subjects(records))
    if absent:
        raise FoldError(f"test / val subject(s) {absent} have no records")
    return _assign(records, lambda i, r: "test" if r.subject in test_set else
                   "val" if r.subject in val_set else "train")


def fold_test_subjects(records: Sequence[Record], protocol: FoldProtocol, test_fold: int) -> list[str]:
    """The subjects of fold `test_fold` (1-based) that have records. Every record's subject must
    be in some fold."""
    check_folds(protocol)
    if not 1 <= test_fold <= len(protocol.folds):
        raise FoldError(f"test_fold must be 1..{len(protocol.folds)}, got {test_fold}")
    present = _subjects(records)
    stray = sorted(present - protocol.subjects)
    if stray:
        raise FoldError(f"subject(s) {stray} of the records are in no fold of {protocol.dataset!r}")
    return sorted(present & set(protocol.folds[test_fold - 1]))


def split_by_fold(records: Sequence[Record], protocol: FoldProtocol, test_fold: int) -> Split:
    """Hold out fold `test_fold` (1-based); train on the others. Every record's subject must be
    in some fold."""
    return split_by_subjects(records, fold_test_subjects(records, protocol, test_fold))


def random_split(records: Sequence[Record], test_fraction: float, seed: int = 0,
                 val_fraction: float = 0.0) -> Split:
    """A seeded random image-level split (Exp-BLIP's RAF-AU / EmotioNet protocol); val, when
    asked for, is drawn after test from the same shuffled order."""
    if not (0.0 <= test_fraction < 1.0 and 0.0 <= val_fraction < 1.0 and 0.0 < test_fraction + val_fraction < 1.0):
        raise FoldError(f"test_fraction and val_fraction must be in [0, 1), not both 0, sum < 1; "
                        f"got {test_fraction}, {val_fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test, n_val = _count(len(order), test_fraction), _count(len(order), val_fraction)
    if n_test + n_val >= len(order):
        raise FoldError(f"{len(order)} records leave none for train after {n_test} test + {n_val} val")
    test_idx, val_idx = set(order[:n_test]), set(order[n_test:n_test + n_val])
    return _assign(records, lambda i, r: "test" if i in test_idx else "val" if i in val_idx else "train")


def split_records(records: Sequence[Record], cfg: SplitConfig, seed: int = 0) -> Split:
    """Split `records` as `cfg` says: by subject when they carry subjects (subjects are drawn,
    seeded, from their sorted list), by image when none does."""
    cfg.validate()
    if all(r.subject is None for r in records):
        if cfg.fold_protocol:
            raise FoldError(f"split.fold_protocol={cfg.fold_protocol!r} needs records with subjects; "
                            f"these have none")
        return random_split(records, cfg.test_fraction, seed=seed, val_fraction=cfg.val_fraction)
    order = sorted(_subjects(records))
    random.Random(seed).shuffle(order)
    if cfg.fold_protocol:
        test = fold_test_subjects(records, load_protocol(cfg.fold_protocol), cfg.test_fold)
        if not test:
            raise FoldError(f"no record has a subject of fold {cfg.test_fold} of {cfg.fold_protocol!r}")
    else:
        test = order[:_count(len(order), cfg.test_fraction)]
    held = set(test)
    rest = [s for s in order if s not in held]
    val = rest[:_count(len(order), cfg.val_fraction)]
    if len(val) == len(rest):
        raise FoldError(f"{len(order)} subjects leave none for train after {len(test)} test + {len(val)} val")
    return split_by_subjects(records, test, val)


def _count(n: int, fraction: float) -> int:
    """How many of n items a fraction asks for: at least one when it is > 0 (a tiny dataset still
    gets the split it was asked for)."""
    return max(1, round(n * fraction)) if fraction > 0 else 0


def _subjects(records: Sequence[Record]) -> set[str]:
    missing = [r.id for r in records if r.subject is None]
    if missing:
        raise FoldError(f"records without a subject cannot be split by subject: {missing[:5]}")
    return {r.subject for r in records}


def _assign(records: Sequence[Record], split_of: Callable[[int, Record], str]) -> Split:
    """Copies of the records with split set to "train" / "val" / "test" by `split_of(index, record)`."""
    split = Split(train=[], test=[])
    for i, r in enumerate(records):
        name = split_of(i, r)
        getattr(split, name).append(dataclasses.replace(r, split=name))
    return split
