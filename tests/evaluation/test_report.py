"""models/report.py: files written, JSON round trip, formatted tables, non-trivial PNGs."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from expvl.evaluation.metrics import AUMetrics, EmotionMetrics, caption_scores, faithfulness
from expvl.evaluation.report import json_safe, write_report
from expvl.vocab.facs import EMOTIONS, SYNTHFACS_AUS


def _face(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(150, 230, 3)))
    d = ImageDraw.Draw(im)
    d.ellipse((8, 4, size - 8, size - 4), fill=(230, 190, 160))
    d.ellipse((20, 22, 26, 28), fill=(40, 40, 40))
    d.ellipse((38, 22, 44, 28), fill=(40, 40, 40))
    d.arc((22, 36, 42, 50), 0, 180, fill=(150, 40, 40), width=2)
    return im


def _metrics() -> dict:
    g = torch.Generator().manual_seed(0)
    aus = list(SYNTHFACS_AUS)
    targets = (torch.rand(40, len(aus), generator=g) < 0.4).long()
    noisy = torch.where(torch.rand(40, len(aus), generator=g) < 0.25, 1 - targets, targets)
    scoring, generation = AUMetrics(aus), AUMetrics(aus)
    scoring.update(noisy, targets)
    generation.update_answers([aus[i % len(aus)] for i in range(60)],
                              ["Yes." if i % 3 else "no" if i % 5 else "I think so" for i in range(60)],
                              [i % 2 for i in range(60)])
    emotion = EmotionMetrics(EMOTIONS)
    truth = [EMOTIONS[i % 8] for i in range(48)]
    emotion.update_answers([f"the person looks {t}" if i % 4 else "happy" if i % 8 else "unclear"
                            for i, t in enumerate(truth)], truth)
    return {
        "meta": {"run": "test", "checkpoint": "none"},
        "au_vqa_scoring": scoring.compute(), "au_vqa_generation": generation.compute(),
        "zero_shot_aus": ["AU9", "AU10", "AU43"],
        "emotion": emotion.compute(),
        "captions": caption_scores(["the inner brows are raised"], [["the inner brows are raised"]],
                                   meteor=False),
        "probes": {"AU detection (SynthFACS)": {"metric": "macro F1", "probe": 0.41, "supervised": 0.55},
                   "emotion (SynthFACS)": {"metric": "accuracy", "probe": 0.62}},
        "faithfulness": faithfulness(["The cheeks are raised and the person smiles."],
                                     [{"AU6": 1, "AU12": 1, "AU4": 0}]),
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    metrics = _metrics()
    gallery = [{"image": _face(i), "title": f"face {i}", "text": "The inner eyebrows are raised and the "
                "lip corners are pulled up, with the cheeks raised. The person looks happy. " * (1 + i % 3)}
               for i in range(6)]
    path = out / "face.png"
    _face(9).save(path)
    gallery[0]["image"] = path  # a path works too
    yy, xx = np.mgrid[0:14, 0:14]
    attention = [{"image": _face(i), "title": f"face {i}",
                  "attention": np.stack([np.exp(-((yy - q) ** 2 + (xx - 13 + q) ** 2) / 8.0) for q in range(0, 14, 2)])}
                 for i in range(2)]
    attention.append({"image": _face(5), "attention": np.random.default_rng(0).random((14, 14))})
    return out, metrics, write_report(out, metrics, gallery=gallery, attention_maps=attention)


def test_files_written(written):
    out, _, files = written
    assert set(files) == {"metrics", "report", "au_f1", "emotion_confusion", "gallery", "attention"}
    assert all(p.exists() and p.parent == out and p.stat().st_size > 0 for p in files.values())


def test_metrics_json_round_trips(written):
    _, metrics, files = written
    assert json.loads(files["metrics"].read_text()) == metrics


def test_report_md_tables(written):
    _, metrics, files = written
    md = files["report"].read_text()
    for key in ("au_vqa_scoring", "au_vqa_generation"):
        assert f"**{100 * metrics[key]['macro_f1']:.1f}**" in md
    assert "| AU9 | zero-shot |" in md and "| AU1 | seen |" in md and "macro zero-shot" in md
    chance = metrics["au_vqa_scoring"]["always_yes_f1"]  # the chance column, from the scoring questions
    assert "always 'yes'" in md and f" {100 * chance['AU9']:.1f} |" in md
    assert f"Top-1 accuracy **{100 * metrics['emotion']['accuracy']:.1f}**" in md
    assert f"{metrics['au_vqa_generation']['unparsed']} of 60 answers" in md
    assert "| ROUGE-L | 100.0 |" in md and "METEOR not computed" in md
    assert "| AU detection (SynthFACS) | macro F1 | 41.0 | 55.0 |" in md and "| 62.0 | – |" in md
    assert "![gallery](gallery.png)" in md


@pytest.mark.parametrize("name", ["au_f1", "emotion_confusion", "gallery", "attention"])
def test_pngs_are_real_images(written, name):
    _, _, files = written
    with Image.open(files[name]) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert 300 <= w <= 4000 and 200 <= h <= 4000, (w, h)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 10


def test_sections_are_optional(tmp_path):
    files = write_report(tmp_path, {"emotion": EmotionMetrics(["a", "b"]).compute()})
    assert set(files) == {"metrics", "report"}  # no samples -> no confusion plot
    assert "## Emotion" in files["report"].read_text()
    files = write_report(tmp_path / "empty", {})
    assert files["report"].read_text().startswith("# Evaluation report")


def test_json_safe_converts_and_rejects():
    out = json_safe({"t": torch.tensor([1.5, 2.0]), "a": np.float32(0.25), "n": math.nan, 3: (1, 2)})
    assert out == {"t": [1.5, 2.0], "a": 0.25, "n": None, "3": [1, 2]}
    with pytest.raises(TypeError, match=r"metrics\.x\.y"):
        json_safe({"x": {"y": object()}})


def test_bad_attention_shape(tmp_path):
    with pytest.raises(ValueError, match="attention must be"):
        write_report(tmp_path, {}, attention_maps=[{"image": _face(0), "attention": np.zeros(5)}])
