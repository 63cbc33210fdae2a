"""The record schema (vocab/records.py) refuses a record of the wrong shape with a RecordError naming the
field, never an AttributeError or TypeError further on (which would lose the shard and line the
reader adds, under either policy)."""

import json

import pytest

from expvl.vocab.records import Record, RecordError


def _good() -> dict:
    return {"id": "r1", "image": "images/1.png", "source": "synthfacs", "split": "train", "subject": "s1",
            "aus": {"AU1": 1, "AU12": 0}, "intensities": {"AU1": 2.5}, "emotion": "happiness",
            "captions": {"emotion": "The face shows happiness."},
            "vqa": [{"type": "q3", "question": "Are the inner brows raised?", "answer": "yes", "au": "AU1"}]}


def _with(path: str, value) -> dict:
    """The good record with one field (dotted: "vqa.0.question") replaced."""
    d = _good()
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return d


# (field, value, what the message says): each crashed with AttributeError or passed before
BAD = [
    ("aus", ["AU1", "AU12"], r"aus must be an object .*got list"),
    ("captions", "The face shows happiness.", r"captions must be an object .*got str"),
    ("intensities", [2.5], r"intensities must be an object"),
    ("meta", "seed 3", r"meta must be an object"),
    ("subject", 42, r"subject must be a string or null, got int 42"),
    ("vqa", {"type": "q3"}, r"vqa must be a list of question objects, got dict"),
    ("vqa.0", "Are the inner brows raised?", r"vqa\[0\] must be an object"),
    ("vqa.0.question", 3, r"vqa\[0\]: question must be a string, got int 3"),
    ("vqa.0.answer", ["yes"], r"vqa\[0\]: answer must be a string, got list"),
    ("vqa.0.question", "   ", r"vqa\[0\]: vqa question and answer must be non-empty"),
    ("aus.AU1", True, r"aus\['AU1'\] must be 0 or 1, got True"),
    ("aus.AU1", 1.0, r"aus\['AU1'\] must be 0 or 1, got 1\.0"),
    ("aus.AU1", 2, r"aus\['AU1'\] must be 0 or 1, got 2"),
    ("intensities.AU1", True, r"intensities\['AU1'\] must be a number in \[0, 5\], got True"),
    ("intensities.AU1", float("nan"), r"intensities\['AU1'\] must be a number in \[0, 5\], got nan"),
    ("captions.emotion", 7, r"captions\['emotion'\] must be a non-empty string"),
]


@pytest.mark.parametrize("field, value, match", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_a_field_of_the_wrong_shape_is_a_record_error_naming_it(field, value, match):
    with pytest.raises(RecordError, match=match):
        Record.from_json(json.dumps(_with(field, value)))


def test_the_good_record_and_its_round_trip_pass():
    record = Record.from_json(json.dumps(_good()))
    assert Record.from_json(record.to_json()) == record and record.positive_aus == ["AU1"]
