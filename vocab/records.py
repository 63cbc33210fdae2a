"""The record schema: one JSON object per image, written by `synthesis/`, read by `datamodules/`.

A shard is a JSONL file; each line is one `Record`. Everything downstream (captions, VQA pairs,
labels for metrics) comes from these fields, so validation is strict: `Record.from_json` raises a
`RecordError` naming the offending field, and callers add the shard path and line number.

    {"id": "synthfacs/train/000123",          unique within a dataset
     "image": "images/train/000123.png",      path relative to the dataset root (the folder
                                              holding the manifest), or absolute
     "source": "synthfacs", "split": "train",
     "subject": "id0042",                     identity / subject id (subject-exclusive splits)
     "aus": {"AU1": 1, "AU2": 0, ...},        occurrence of every *annotated* AU; AUs absent
                                              from the dict are unannotated, not negative
     "intensities": {"AU12": 3.5, ...},       optional FACS intensity 0-5
     "emotion": "happiness" | null,
     "captions": {"au_rule": "...", ...},     named captions (see CAPTION_KINDS)
     "vqa": [{"type": "q3", "question": "...", "answer": "yes", "au": "AU12"}, ...],
     "meta": {...}}                           free-form (renderer seed, pose, ...)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from expvl.vocab.facs import AUS, EMOTIONS, REGIONS

# Named caption kinds. au_rule: Exp-BLIP rule-based AU caption ("fluent" mode unless
# au_paper); au_paper: the paper's exact template; au_llm: one-shot GPT-style AU caption;
# emotion: "The face shows happiness."; fused: LLM zero-shot fusion; cat: rule-based
# Cat-BLIP concatenation; region:<name>: Q2-style regional description.
CAPTION_KINDS = ("au_rule", "au_paper", "au_llm", "emotion", "fused", "cat")
VQA_TYPES = ("q1", "q2", "q3", "emotion")


class RecordError(ValueError):
    """A record that does not follow the schema; the message names the field."""


def _require(name: str, value, kind: type, what: str) -> None:
    """`value` is a `kind` (JSON gives any type anywhere: a list for an object, a number for a string), else
    a RecordError naming the field; never an AttributeError further on, which would lose the shard and line."""
    if not isinstance(value, kind):
        raise RecordError(f"{name} must be {what}, got {type(value).__name__} {value!r}"[:200])


@dataclass
class VQAPair:
    type: str  # q1 whole face + emotion, q2 one region, q3 one AU yes/no, emotion
    question: str
    answer: str
    au: str | None = None  # q3 only
    region: str | None = None  # q2 only

    def validate(self) -> None:
        if self.type not in VQA_TYPES:
            raise RecordError(f"vqa.type {self.type!r} is not one of {VQA_TYPES}")
        _require("question", self.question, str, "a string")
        _require("answer", self.answer, str, "a string")
        if not self.question.strip() or not self.answer.strip():
            raise RecordError("vqa question and answer must be non-empty")
        if self.type == "q3":
            if self.au not in AUS:
                raise RecordError(f"q3 pair needs a known au, got {self.au!r}")
            if self.answer not in ("yes", "no"):
                raise RecordError(f"q3 answer must be 'yes' or 'no', got {self.answer!r}")
        if self.type == "q2" and self.region not in REGIONS:
            raise RecordError(f"q2 pair needs a region in {REGIONS}, got {self.region!r}")


@dataclass
class Record:
    id: str
    image: str
    source: str
    split: str
    subject: str | None = None
    aus: dict[str, int] = field(default_factory=dict)
    intensities: dict[str, float] = field(default_factory=dict)
    emotion: str | None = None
    captions: dict[str, str] = field(default_factory=dict)
    vqa: list[VQAPair] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def validate(self) -> Record:
        for name in ("id", "image", "source", "split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RecordError(f"field {name!r} must be a non-empty string")
        if self.subject is not None:
            _require("subject", self.subject, str, "a string or null")
        for name in ("aus", "intensities", "captions", "meta"):
            _require(name, getattr(self, name), dict, "an object ({key: value, ...})")
        for au, v in self.aus.items():
            if au not in AUS:
                raise RecordError(f"aus: unknown action unit {au!r}")
            if type(v) is not int or v not in (0, 1):  # not True / 1.0: a label is 0 or 1, as written
                raise RecordError(f"aus[{au!r}] must be 0 or 1, got {v!r}")
        for au, v in self.intensities.items():
            if au not in AUS:
                raise RecordError(f"intensities: unknown action unit {au!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 5:
                raise RecordError(f"intensities[{au!r}] must be a number in [0, 5], got {v!r}")
        if self.emotion is not None and self.emotion not in EMOTIONS:
            raise RecordError(f"emotion {self.emotion!r} is not one of {EMOTIONS}")
        for kind, text in self.captions.items():
            if kind not in CAPTION_KINDS and not kind.startswith("region:"):
                raise RecordError(f"captions: unknown caption kind {kind!r}")
            if not isinstance(text, str) or not text.strip():
                raise RecordError(f"captions[{kind!r}] must be a non-empty string")
        for i, pair in enumerate(self.vqa):
            try:
                pair.validate()
            except RecordError as e:
                raise RecordError(f"vqa[{i}]: {e}") from None
        return self

    @property
    def positive_aus(self) -> list[str]:
        return [au for au, v in self.aus.items() if v]

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        if not isinstance(d, dict):
            raise RecordError(f"a record must be a JSON object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise RecordError(f"unknown field(s) {sorted(unknown)}")
        missing = {"id", "image", "source", "split"} - set(d)
        if missing:
            raise RecordError(f"missing field(s) {sorted(missing)}")
        _require("vqa", d.get("vqa", []), list, "a list of question objects")
        for i, p in enumerate(d.get("vqa", [])):
            _require(f"vqa[{i}]", p, dict, "an object ({type, question, answer, ...})")
        try:
            vqa = [VQAPair(**p) for p in d.get("vqa", [])]
        except TypeError as e:
            raise RecordError(f"vqa: {e}") from None
        return cls(**{**d, "vqa": vqa}).validate()

    @classmethod
    def from_json(cls, line: str) -> Record:
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"not valid JSON ({e.msg} at column {e.colno})") from None
        return cls.from_dict(d)
