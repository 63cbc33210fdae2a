"""The zero-shot threshold that uses no label of the zero-shot AU, the margin AUC, and the Q3 wordings
the evaluation asks besides the trained ones (evaluation/vqa.py, synthesis/vqa.py)."""

import random

import pytest
import torch

from expvl.evaluation.vqa import margin_auc, prior_threshold, trained_wordings
from expvl.synthesis.vqa import Q3_PARAPHRASES, Q3_QUESTIONS, VQAConfig, format_q3, q3_pairs
from expvl.vocab.facs import AUS
from expvl.vocab.records import Record, VQAPair


def test_prior_threshold_answers_yes_to_the_prior_share_of_faces():
    margins = torch.linspace(-5.0, -1.0, 101)  # a question never trained: every margin says "no"
    t = prior_threshold(margins, 0.2)
    assert (margins > t).float().mean().item() == pytest.approx(0.2, abs=0.011)
    assert prior_threshold(margins, 0.0) == 0.0 and prior_threshold(torch.zeros(0), 0.3) == 0.0
    assert (margins > 0).sum() == 0  # the plain decision would never say "yes" here


def test_margin_auc_ranks_per_au_and_skips_one_sided_aus():
    rec = Record(id="r", image="x.png", source="synthfacs", split="test", aus={"AU1": 1})
    pairs = [(rec, VQAPair("q3", "q", a, au="AU1")) for a in ("yes", "yes", "no", "no")]
    pairs += [(rec, VQAPair("q3", "q", "no", au="AU2")) for _ in range(2)]
    auc = margin_auc(pairs, torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0, 1.0]))
    assert auc == {"AU1": 1.0}  # AU2 has no positive: no AUC
    assert margin_auc(pairs, torch.tensor([-2.0, -1.0, 0.5, 1.0, 0.0, 1.0]))["AU1"] == 0.0


def test_every_au_has_every_wording_and_the_paraphrases_are_new_questions():
    for au in AUS:
        questions = [format_q3(t, au) for t in Q3_PARAPHRASES]
        assert all(q.endswith("?") and "{" not in q for q in questions), questions
    assert format_q3("Does the face show {np}?", "AU9") == "Does the face show a wrinkled nose?"
    assert "{state}?" not in Q3_PARAPHRASES and set(Q3_PARAPHRASES) - set(Q3_QUESTIONS)


def test_trained_wordings_are_read_from_the_training_questions():
    rng = random.Random(0)
    cfg = VQAConfig(q3_templates=["{state}?"], heldout_aus=["AU9"])
    recs = []
    for i in range(5):
        r = Record(id=f"f{i}", image="x.png", source="synthfacs", split="train", aus={"AU1": i % 2, "AU4": 1 - i % 2, "AU9": 1})
        r.vqa = q3_pairs(r, cfg, rng, train=True)
        recs.append(r)
    assert trained_wordings(recs) == ["{state}?"]
    recs[0].vqa.append(VQAPair("q3", format_q3("Does the face show {np}?", "AU4"), "no", au="AU4"))
    assert trained_wordings(recs) == ["{state}?", "Does the face show {np}?"]
    assert trained_wordings([]) == []
