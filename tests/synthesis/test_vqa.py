"""VQA assembly: question types, balance, held-out AUs, determinism, validation."""

import random

import pytest

from expvl.synthesis import text_rules
from expvl.synthesis.vqa import Q1_CANONICAL, VQAConfig, add_vqa, make_vqa, record_rng
from expvl.vocab.facs import AUS, SYNTHFACS_AUS
from expvl.vocab.records import Record, RecordError, VQAPair


def make_records(n=60, split="train", seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        active = set(rng.sample(SYNTHFACS_AUS, rng.randint(0, 5)))
        aus = {au: int(au in active) for au in SYNTHFACS_AUS}
        emotion = rng.choice(["happiness", "anger", "neutral", None])
        r = Record(f"t/{split}/{i}", f"images/{i}.png", "test", split, aus=aus,
                   intensities={a: 3.0 for a in active}, emotion=emotion)
        r.captions = text_rules.rule_captions(r.aus, r.emotion, record_rng(0, r.id, "text"))
        out.append(r)
    return out


def test_pairs_types_and_answers():
    cfg = VQAConfig()
    for r in make_records():
        pairs = make_vqa(r, cfg, seed=0)
        types = [p.type for p in pairs]
        if r.emotion is not None:
            q1 = [p for p in pairs if p.type == "q1"]
            assert len(q1) == 1 and q1[0].answer == r.captions["fused"]
            assert [p.answer for p in pairs if p.type == "emotion"] == [r.emotion]
        else:
            assert "q1" not in types and "emotion" not in types
        for p in pairs:
            p.validate()
            if p.type == "q3":
                assert p.answer == ("yes" if r.aus[p.au] else "no")
            if p.type == "q2":
                assert p.answer == r.captions[f"region:{p.region}"]
                assert any(AUS[a].region == p.region for a in r.aus)
        assert types.count("q2") == min(2, sum(1 for k in r.captions if k.startswith("region:")))


def test_q3_balanced_per_image_and_overall():
    cfg = VQAConfig(q3_per_image=4)
    yes = no = 0
    for r in make_records(200):
        q3 = [p for p in make_vqa(r, cfg, seed=1) if p.type == "q3"]
        n_yes = sum(p.answer == "yes" for p in q3)
        if r.positive_aus:  # both kinds exist (SynthFACS labels many AUs negative)
            assert n_yes == len(q3) - n_yes >= 1
        else:
            assert len(q3) == 1 and q3[0].answer == "no"
        assert len({p.au for p in q3}) == len(q3)  # no AU asked twice
        yes, no = yes + n_yes, no + len(q3) - n_yes
    assert 0.4 < yes / (yes + no) < 0.6


def test_q3_absent_per_present_sets_the_training_yes_rate():
    cfg = VQAConfig(q3_per_image=16, q3_absent_per_present=2.0)
    yes = no = 0
    for r in make_records(200):
        q3 = [p for p in make_vqa(r, cfg, seed=1) if p.type == "q3"]
        n_yes = sum(p.answer == "yes" for p in q3)
        n_neg = sum(not v for v in r.aus.values())
        if r.positive_aus and n_neg >= 2 * len(r.positive_aus):  # enough absent AUs to ask two per present
            assert n_yes == len(r.positive_aus) and len(q3) - n_yes == 2 * n_yes
        assert len(q3) <= 16 and len({p.au for p in q3}) == len(q3)
        yes, no = yes + n_yes, no + len(q3) - n_yes
    assert 0.28 < yes / (yes + no) < 0.38
    with pytest.raises(ValueError, match="q3_absent_per_present"):
        VQAConfig(q3_absent_per_present=0).validate()


def test_heldout_aus_only_leave_training_q3():
    cfg = VQAConfig(heldout_aus=["AU12", "AU4"], q3_per_image=8)
    train, test = make_records(150, "train"), make_records(40, "test", seed=1)
    asked_train = {p.au for r in train for p in make_vqa(r, cfg, seed=0) if p.type == "q3"}
    assert asked_train and not asked_train & {"AU12", "AU4"}
    # held-out AUs may still be described in Q1 / Q2 training answers (zero-shot premise)
    described = [p for r in train for p in make_vqa(r, cfg, seed=0)
                 if p.type in ("q1", "q2") and ("lip corners" in p.answer or "brows" in p.answer)]
    assert described
    for r in test:  # eval splits: one question per annotated AU, held-out ones included
        q3 = [p for p in make_vqa(r, cfg, seed=0) if p.type == "q3"]
        assert sorted(p.au for p in q3) == sorted(r.aus)
        assert all(p.question for p in q3)
    q1 = [p for r in test for p in make_vqa(r, cfg, seed=0) if p.type == "q1"]
    assert q1 and all(p.question == Q1_CANONICAL for p in q1)


def test_deterministic_and_order_independent():
    cfg = VQAConfig()
    recs = make_records(30)
    a = {r.id: make_vqa(r, cfg, seed=5) for r in recs}
    b = {r.id: make_vqa(r, cfg, seed=5) for r in reversed(recs)}
    assert a == b
    c = {r.id: make_vqa(r, cfg, seed=6) for r in recs}
    assert a != c
    questions = {p.question for ps in a.values() for p in ps if p.type == "q3"}
    assert any("(" in q for q in questions) and any(q.startswith(("Is the", "Are the")) for q in questions)


def test_config_and_record_validation():
    with pytest.raises(ValueError, match="AU99"):
        VQAConfig(heldout_aus=["AU99"]).validate()
    r = add_vqa(make_records(1)[0], VQAConfig(), seed=0)
    assert r.vqa and Record.from_json(r.to_json()).vqa == r.vqa
    with pytest.raises(RecordError):
        VQAPair("q3", "Is it?", "maybe", au="AU1").validate()


def test_q3_templates_choose_the_question_forms():
    from expvl.synthesis.vqa import QUESTION_STATE

    cfg = VQAConfig(q3_templates=["{state}?"])
    cfg.validate()
    asked = [(p.au, p.question) for r in make_records() for p in make_vqa(r, cfg, seed=0) if p.type == "q3"]
    assert asked and all(q == QUESTION_STATE[au] + "?" for au, q in asked)
    mixed = {p.question for r in make_records() for p in make_vqa(r, VQAConfig(), seed=0) if p.type == "q3"}
    assert any("AU" in q for q in mixed)  # the full set also names AUs by number
    with pytest.raises(ValueError, match="q3_templates"):
        VQAConfig(q3_templates=["Is {au} there?"]).validate()
    with pytest.raises(ValueError, match="empty"):
        VQAConfig(q3_templates=[]).validate()


def test_emotion_per_image_asks_distinct_paraphrases_in_training_only():
    from dataclasses import replace as dc_replace

    from expvl.synthesis.vqa import EMOTION_QUESTIONS
    cfg = dc_replace(VQAConfig(), emotion_per_image=3)
    cfg.validate()
    r = next(r for r in make_records() if r.emotion is not None)
    train = [p for p in make_vqa(r, cfg, seed=0) if p.type == "emotion"]
    assert sorted(p.question for p in train) == sorted(EMOTION_QUESTIONS)
    assert {p.answer for p in train} == {r.emotion}
    r.split = "test"
    test = [p for p in make_vqa(r, cfg, seed=0) if p.type == "emotion"]
    assert [p.question for p in test] == [EMOTION_QUESTIONS[0]]
    for bad in (0, len(EMOTION_QUESTIONS) + 1):
        with pytest.raises(ValueError, match="emotion_per_image"):
            dc_replace(VQAConfig(), emotion_per_image=bad).validate()
