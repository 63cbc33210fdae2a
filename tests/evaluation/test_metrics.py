"""models/metrics.py against hand-computed values."""

import importlib.util
import shutil

import pytest
import torch

from expvl.evaluation.metrics import (
    AUMetrics,
    EmotionMetrics,
    caption_scores,
    faithfulness,
    parse_emotion,
    parse_yes_no,
)


@pytest.mark.parametrize("text, expected", [
    ("yes", 1), ("Yes.", 1), ("YES, AU12 is present.", 1), ('  "yes" ', 1), ("no", 0), ("No!", 0),
    ("no, the brows are not raised", 0), ("Not really", None), ("Yesterday", None), ("nope", None),
    ("The answer is yes", None), ("", None)])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("The person looks happy.", "happiness"),
    ("Raised cheeks suggest joy, maybe surprise.", "happiness"),
    ("She seems scared.", "fear"), ("He is AFRAID", "fear"),
    ("This person is not happy; they look sad.", "sadness"),
    ("He doesn't look angry, he looks disgusted", "disgust"),
    ("The face is unhappy", "sadness"),  # "unhappy" is not "happy"
    ("A calm, neutral expression", "neutral"),
    ("contemptuous smirk", "contempt"),
    ("The mouth is in a relaxed position", None),
    ("no emotion words here", None)])
def test_parse_emotion(text, expected):
    assert parse_emotion(text) == expected


def test_parse_emotion_respects_label_subset():
    assert parse_emotion("contempt or happiness", labels=("happiness", "sadness")) == "happiness"
    assert parse_emotion("feeling awe", labels=("awe", "happiness")) == "awe"  # literal label


def test_au_f1_by_hand_and_mask_ignores_unannotated():
    aus = ["AU1", "AU4", "AU12"]
    preds = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1], [0, 0, 1]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 1], [0, 0, 0]])
    # AU1: tp1 fp1 fn1 -> F1 1/2; AU4: tp1 fp1 fn0 -> 2/3; AU12: tp2 fp1 fn1 -> 2/3
    m = AUMetrics(aus)
    m.update(preds, targets)
    out = m.compute()
    assert out["f1"] == pytest.approx({"AU1": 0.5, "AU4": 2 / 3, "AU12": 2 / 3})
    assert out["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert out["precision"]["AU12"] == pytest.approx(2 / 3) and out["recall"]["AU1"] == 0.5
    assert out["support"] == {"AU1": 2, "AU4": 1, "AU12": 3}
    # saying "yes" to all 4 rows: AU1 2 of 4 positive -> 2*2/(2*2+2); AU4 1 of 4; AU12 3 of 4
    assert out["always_yes_f1"] == pytest.approx({"AU1": 4 / 6, "AU4": 2 / 5, "AU12": 6 / 7})

    # A fifth row that would be a false positive for AU1, but AU1 is not annotated there,
    # and a wrong entry for AU4 that is masked too: nothing changes.
    m2 = AUMetrics(aus)
    annotated = torch.ones(5, 3, dtype=torch.bool)
    annotated[4, :2] = False
    m2.update(torch.cat([preds, torch.tensor([[1, 1, 0]])]), torch.cat([targets, torch.tensor([[0, 0, 0]])]),
              annotated)
    assert m2.compute()["f1"] == pytest.approx(out["f1"])
    # the masked entries leave AU1 / AU4's chance level alone; AU12 is annotated there (one more negative)
    assert m2.compute()["always_yes_f1"] == pytest.approx({"AU1": 4 / 6, "AU4": 2 / 5, "AU12": 6 / 8})
    # ... whereas annotating it does change AU1.
    m3 = AUMetrics(aus)
    m3.update(torch.cat([preds, torch.tensor([[1, 0, 0]])]), torch.cat([targets, torch.tensor([[0, 0, 0]])]))
    assert m3.compute()["f1"]["AU1"] == pytest.approx(2 * 1 / (2 + 2 + 1))


def test_au_macro_skips_aus_without_positives_and_accumulates():
    m = AUMetrics(["AU1", "AU2"])
    m.update(torch.tensor([[1, 1]]), torch.tensor([[1, 0]]))
    m.update(torch.tensor([[0, 0]]), torch.tensor([[1, 0]]))
    out = m.compute()
    assert out["skipped"] == ["AU2"] and "AU2" not in out["f1"]
    assert out["macro_f1"] == pytest.approx(2 / 3)  # AU1: tp1 fn1
    m.reset()
    m.update(torch.tensor([[1, 0]]), torch.tensor([[1, 0]]))
    assert m.compute()["macro_f1"] == 1.0


def test_au_update_answers_counts_unparsed_as_negative():
    m = AUMetrics(["AU1", "AU12"])
    m.update_answers(["AU1", "AU1", "AU12", "12"], ["Yes.", "maybe", "no", "yes, clearly"], [1, 1, 1, 0])
    out = m.compute()
    # AU1: yes(1) tp, unparsed->0 vs 1 fn -> F1 2/3; AU12: no vs 1 fn, yes vs 0 fp -> F1 0
    assert out["f1"] == pytest.approx({"AU1": 2 / 3, "AU12": 0.0})
    assert out["unparsed"] == 1 and out["answers"] == 4


def test_au_bad_input_raises():
    m = AUMetrics(["AU1", "AU2"])
    with pytest.raises(ValueError, match="must"):
        m.update(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="0/1"):
        m.update(torch.full((1, 2), 2), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(KeyError, match="AU99"):
        AUMetrics(["AU99"])


def test_emotion_metrics_confusion_and_unparsed():
    labels = ["neutral", "happiness", "sadness"]
    m = EmotionMetrics(labels)
    m.update_answers(["calm", "she looks happy", "happy!", "a sad face", "hmm", "neutral"],
                     ["neutral", "happiness", "sadness", "sadness", "happiness", "happiness"])
    out = m.compute()
    assert out["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]  # rows true, cols predicted
    assert out["unparsed"] == 1 and out["n"] == 6
    assert out["support"] == {"neutral": 1, "happiness": 3, "sadness": 2}
    assert out["accuracy"] == pytest.approx(3 / 6)
    assert out["per_class_accuracy"] == pytest.approx({"neutral": 1.0, "happiness": 1 / 3, "sadness": 0.5})
    assert out["macro_accuracy"] == pytest.approx((1 + 1 / 3 + 0.5) / 3)


def test_emotion_metrics_from_logits():
    m = EmotionMetrics(["a", "b"])
    m.update(torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]]), torch.tensor([0, 1, 1]))
    out = m.compute()
    assert out["accuracy"] == pytest.approx(2 / 3) and out["unparsed"] == 0
    with pytest.raises(ValueError, match="out of range"):
        m.update(torch.tensor([0]), torch.tensor([2]))


def test_caption_scores_take_max_over_references():
    preds = ["the inner brows are raised", "lips part slightly"]
    refs = [["the person frowns deeply", "the inner brows are raised"], ["a completely different sentence"]]
    out = caption_scores(preds, refs, meteor=False)
    assert out["per_sample"]["rougeL"][0] == pytest.approx(1.0)  # identical reference wins
    assert out["per_sample"]["bleu4"][0] == pytest.approx(1.0)
    assert out["per_sample"]["rougeL"][1] == 0.0
    assert out["rougeL"] == pytest.approx(0.5) and out["n"] == 2
    assert "meteor" not in out and "meteor_unavailable" in out
    # ROUGE-L by hand: LCS("a b c d", "a x c") = 2 -> P 2/3 (pred), R 2/4 -> F = 4/7
    assert caption_scores(["a x c"], [["a b c d", "zzz"]], meteor=False)["rougeL"] == pytest.approx(4 / 7)
    with pytest.raises(ValueError, match="no reference"):
        caption_scores(["x"], [[]], meteor=False)


def test_faithfulness_micro_counts():
    texts = ["The inner brows are raised and the lip corners are pulled up.", "There is no frown.", "x"]
    labels = [{"AU1": 1, "AU4": 1, "AU12": 0}, {"AU4": 0}, {"AU6": 1}]
    out = faithfulness(texts, labels)
    # sample 1: said {AU1, AU12} -> tp AU1, fp AU12, fn AU4; sample 2: negated -> nothing; 3: fn AU6
    assert (out["tp"], out["fp"], out["fn"]) == (1, 1, 2)
    assert out["precision"] == 0.5 and out["recall"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(2 / 5)
    assert out["exact"] == pytest.approx(1 / 3)


def test_faithfulness_custom_matcher_ignores_unannotated_mentions():
    out = faithfulness(["anything"], [{"AU1": 1}], matcher=lambda t: ["AU1", "AU43"])
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["exact"] == 1.0


@pytest.mark.slow  # starts a JVM that loads METEOR's paraphrase table (~30 s on 2 busy cores)
@pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None or shutil.which("java") is None,
                    reason="METEOR needs pycocoevalcap (the `metrics` extra) and java")
def test_meteor_identical_beats_unrelated():
    out = caption_scores(["the inner brows are raised", "the inner brows are raised"],
                         [["the inner brows are raised"], ["a dog runs across the park"]])
    assert "meteor_unavailable" not in out
    same, unrelated = out["per_sample"]["meteor"]
    assert same > 0.9 and unrelated < 0.2 and same > unrelated


def test_meteor_reports_missing_java(monkeypatch):
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr("expvl.evaluation.metrics.shutil.which", lambda name: None)
    out = caption_scores(["a b"], [["a b"]])
    assert "java" in out["meteor_unavailable"] and "meteor" not in out


def test_best_threshold_separates_margins_and_falls_back_without_positives():
    from expvl.evaluation.vqa import best_threshold

    margins = torch.tensor([-3.0, -2.0, -1.5, 0.5, 1.0, 2.0, 2.5, 3.0])
    positive = [False, False, False, False, True, True, True, True]  # the model says "yes" too easily
    t = best_threshold(margins, positive)
    assert 0.5 <= t < 1.0  # everything above t is a positive: F1 1.0, where margin > 0 gives 0.89
    assert best_threshold(margins, [False] * 8) == 0.0  # no positive to fit on: the plain decision
