"""SynthFACS: determinism, FACS label constraints, prevalence, splits, cache, visible AU cues."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from expvl.synthesis.synthfacs import (
    Expression,
    SynthFACSCacheError,
    SynthFACSConfig,
    config_hash,
    contact_sheet,
    render_dataset,
    render_face,
    sample_params,
    sample_records,
)
from expvl.synthesis.synthfacs import dataset as sf_dataset
from expvl.synthesis.synthfacs.pen import Pen
from expvl.vocab.facs import PROTOTYPES, SYNTHFACS_AUS
from expvl.vocab.records import Record

TINY = {"size": 64, "n_train": 14, "n_val": 5, "n_test": 5, "n_identities_train": 6, "n_identities_test": 2}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "synthfacs.json"}


def test_config_hash_stable_and_ignores_workers():
    a, b = SynthFACSConfig(**TINY), SynthFACSConfig(**TINY, workers=7)
    assert config_hash(a) == config_hash(b) == config_hash(SynthFACSConfig(**TINY))
    assert config_hash(a) != config_hash(SynthFACSConfig(**{**TINY, "size": 72}))
    assert config_hash(a) != config_hash(SynthFACSConfig(**TINY, seed=1))
    with pytest.raises(ValueError, match="emotion_fraction"):
        SynthFACSConfig(emotion_fraction=1.5)


def test_byte_identical_across_worker_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(sf_dataset, "CHUNK", 4)  # several chunks per split -> real interleaving
    cfg = SynthFACSConfig(**TINY)
    one = render_dataset(cfg, tmp_path / "w1", workers=1)
    two = render_dataset(cfg, tmp_path / "w2", workers=2)
    assert [r.to_json() for s in one for r in one[s]] == [r.to_json() for s in two for r in two[s]]
    files1, files2 = _tree_bytes(tmp_path / "w1"), _tree_bytes(tmp_path / "w2")
    assert len(files1) == 14 + 5 + 5 + 3 and files1 == files2
    p = sample_params(cfg, "val", 3)  # and a single face re-renders to the same bytes
    assert render_face(p, 64).tobytes() == Image.open(tmp_path / "w1/images/val/000003.png").tobytes()


def test_records_and_files(tmp_path):
    cfg = SynthFACSConfig(**TINY)
    recs = render_dataset(cfg, tmp_path, workers=1)
    assert {s: len(v) for s, v in recs.items()} == {"train": 14, "val": 5, "test": 5}
    r = recs["train"][3]
    assert r.id == "synthfacs/train/000003" and r.image == "images/train/000003.png"
    assert r.source == "synthfacs" and r.split == "train" and r.subject.startswith("id")
    assert set(r.aus) == set(SYNTHFACS_AUS) and set(r.intensities) == set(r.positive_aus)
    assert "seed" in r.meta and "pose" in r.meta
    img = Image.open(tmp_path / r.image)
    assert img.size == (64, 64) and img.mode == "RGB"
    lines = (tmp_path / "labels_test.jsonl").read_text().splitlines()
    assert [Record.from_json(x) for x in lines] == recs["test"]
    manifest = json.loads((tmp_path / "synthfacs.json").read_text())
    assert manifest["hash"] == config_hash(cfg) and manifest["complete"]
    out = contact_sheet(recs["train"], tmp_path, tmp_path / "sheet.png", n=10, cols=5)
    assert Image.open(out).size == (5 * 128, 2 * (128 + 34))


def test_cache_hit_and_refusal(tmp_path, monkeypatch):
    cfg = SynthFACSConfig(**TINY)
    first = render_dataset(cfg, tmp_path / "ds", workers=1)

    def no_render(task):
        raise AssertionError("cache hit must not re-render")

    monkeypatch.setattr(sf_dataset, "_render_chunk", no_render)
    assert render_dataset(SynthFACSConfig(**TINY, workers=3), tmp_path / "ds") == first
    with pytest.raises(SynthFACSCacheError, match="config hash"):
        render_dataset(SynthFACSConfig(**{**TINY, "seed": 5}), tmp_path / "ds")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(SynthFACSCacheError, match="not empty"):
        render_dataset(cfg, tmp_path / "foreign")


def test_facs_constraints_and_emotion_recoverable():
    recs = sample_records(SynthFACSConfig(), "train", 3000)
    n_emotion = kept = 0
    for r in recs:
        on = set(r.positive_aus)
        assert not ("AU26" in on and "AU25" not in on), r.id
        assert not ("AU16" in on and "AU25" not in on), r.id
        assert not {"AU5", "AU43"} <= on, r.id
        assert not ("AU24" in on and "AU25" in on), r.id
        assert all(1.0 <= v <= 5.0 for v in r.intensities.values())
        if r.emotion is None:
            continue
        n_emotion += 1
        proto = set(PROTOTYPES[r.emotion])
        kept += proto <= on
        assert len(proto - on) <= 1, (r.id, r.emotion, on)  # at most one AU dropped
        if r.emotion == "contempt":  # unilateral: one side only
            for au in ("AU12", "AU14"):
                assert min(r.meta["sides"][au]) == 0 and max(r.meta["sides"][au]) >= 1
    assert 0.5 < n_emotion / len(recs) < 0.7  # emotion_fraction 0.6
    assert kept / n_emotion > 0.85


def test_prevalence_and_intensity():
    recs = sample_records(SynthFACSConfig(seed=3), "train", 2000)
    prevalence = {au: np.mean([r.aus[au] for r in recs]) for au in SYNTHFACS_AUS}
    assert min(prevalence.values()) >= 0.08, prevalence
    intens = np.array([v for r in recs for v in r.intensities.values()])
    assert (intens >= 2).mean() > 0.85
    assert {r.emotion for r in recs} >= set(PROTOTYPES) | {None}


def test_identities_disjoint_across_splits():
    cfg = SynthFACSConfig(n_identities_train=30, n_identities_test=10)
    subjects = {s: {r.subject for r in sample_records(cfg, s, 300)} for s in ("train", "val", "test")}
    assert len(subjects["train"]) > 25 and len(subjects["test"]) == 10
    assert not subjects["train"] & subjects["val"] and not subjects["train"] & subjects["test"]
    assert not subjects["val"] & subjects["test"]


# face-unit vertical bands where each AU's cue must land (x spans the whole face)
REGIONS = {
    "AU1": (-0.95, -0.1), "AU2": (-0.95, -0.1), "AU4": (-0.6, 0.0),
    "AU5": (-0.3, 0.05), "AU7": (-0.3, 0.05), "AU43": (-0.3, 0.05), "AU6": (-0.3, 0.75),
    "AU9": (-0.45, 0.5), "AU10": (0.15, 0.8), "AU12": (0.15, 0.8), "AU14": (0.35, 0.8),
    "AU15": (0.35, 0.85), "AU17": (0.45, 1.05), "AU20": (0.15, 0.8), "AU23": (0.35, 0.8),
    "AU24": (0.35, 0.85), "AU25": (0.35, 0.85), "AU16": (0.35, 0.95), "AU26": (0.35, 1.5),
}


def _clean_params():
    p = sample_params(SynthFACSConfig(), "train", 11)
    n = p.nuisance
    n.roll, n.yaw, n.scale, n.shift, n.noise, n.blur, n.light_strength = 0, 0, 1, (0, 0), 0, 0, 0
    p.expression = Expression()
    return p


@pytest.mark.parametrize("au", SYNTHFACS_AUS)
def test_one_au_changes_its_region(au):
    size = 64
    base = _clean_params()
    on = copy.deepcopy(base)
    on.expression = Expression(sides={au: (4.0, 4.0), **({"AU25": (3.0, 3.0)} if au in ("AU16", "AU26") else {})})
    ref = render_face(base, size)
    if au in ("AU16", "AU26"):  # compare with lips apart alone, so the cue is the AU's own
        base.expression = Expression(sides={"AU25": (3.0, 3.0)})
        ref = render_face(base, size)
    diff = np.abs(np.asarray(render_face(on, size), float) - np.asarray(ref, float)).sum(-1)
    pen = Pen(Image.new("RGB", (size * 2, size * 2)), on)  # pixel rows of the band, at 2x
    (_, y0), (_, y1) = pen.px([(0, REGIONS[au][0]), (0, REGIONS[au][1])], z=0)
    rows = slice(max(0, int(y0 / 2)), int(np.ceil(y1 / 2)))
    inside = diff[rows].sum()
    assert diff.sum() > 0 and inside / diff.sum() > 0.85, (au, inside / max(diff.sum(), 1))
    assert (diff[rows] > 30).sum() >= 6, (au, (diff[rows] > 30).sum())  # >= 6 clearly changed pixels
