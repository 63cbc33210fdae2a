"""Exp-VQA question-answer pairs at three scales, plus a plain emotion question.

Exp-VQA (Pattern Recognition 2025) asks Q1 (whole face: describe the actions and infer the
emotion), Q2 (the actions of one facial region) and Q3 (is one AU present: yes / no), and
reports zero-shot detection of AUs never asked about in training. Only one question string is
confirmed by the official code (test.py): "How can this person's emotion be inferred from their
facial actions?"; the paper's templates, region list and zero-shot split are not public. Everything
else here is our reconstruction: paraphrase lists, the region list (facs.REGIONS), yes/no
answers, Q3 balanced per image, and held-out AUs removed from Q3 *training* questions only (they
may still be described in Q1/Q2 answers, since the premise is that language generalises).

Every choice draws from `random.Random(f"{seed}:{record.id}")`, so the pairs of a record do not
depend on the order or the process that built them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from expvl.synthesis import text_rules
from expvl.vocab.facs import AUS, REGIONS, sort_aus
from expvl.vocab.phrases import PARAPHRASES
from expvl.vocab.records import Record, VQAPair

Q1_CANONICAL = "How can this person's emotion be inferred from their facial actions?"  # EV test.py
Q1_QUESTIONS = (
    Q1_CANONICAL,
    "Describe the facial actions of this person and the emotion they suggest.",
    "Which facial actions does this face show, and what emotion do they indicate?",
    "What do the movements of this face tell us about the person's emotion?",
    "Explain the emotion of this person from the actions of their face.",
)
Q2_QUESTIONS = (
    "What facial actions can be seen in the {region} region?",
    "Describe the movements of the {region}.",
    "What is happening around the {region} of this face?",
    "What does the {region} area of this face show?",
)
EMOTION_QUESTIONS = (
    "What emotion does this face show?",
    "Which emotion is this person expressing?",
    "What is the emotion of this person?",
)
# Q3 names the AU by its action, its FACS noun, or both. "{state}" reads as a yes/no question
# about the visible action (QUESTION_STATE below); "{name}" is "AU1", "{noun}" is the FACS noun.
Q3_QUESTIONS = (
    "{state}?",
    "Does this face show {name} ({noun})?",
    "Is {name} ({noun}) present in this face?",
    "Can you see the {noun} action on this face?",
    "Is the action unit {name} active?",
)
QUESTION_STATE = {
    "AU1": "Are the inner brows raised", "AU2": "Are the outer brows raised",
    "AU4": "Are the brows lowered", "AU5": "Are the upper eyelids raised",
    "AU6": "Are the cheeks raised", "AU7": "Are the eyelids tightened",
    "AU8": "Are the lips pulled toward each other", "AU9": "Is the nose wrinkled",
    "AU10": "Is the upper lip raised", "AU11": "Are the nasolabial folds deepened",
    "AU12": "Are the lip corners pulled up", "AU14": "Are the lip corners tightened",
    "AU15": "Are the lip corners depressed", "AU16": "Is the lower lip depressed",
    "AU17": "Is the chin raised", "AU18": "Are the lips puckered",
    "AU19": "Is the tongue sticking out", "AU20": "Are the lips stretched",
    "AU21": "Is the neck tightened", "AU22": "Are the lips funneled",
    "AU23": "Are the lips tightened", "AU24": "Are the lips pressed together",
    "AU25": "Are the lips parted", "AU26": "Is the jaw dropped",
    "AU27": "Is the mouth stretched wide open", "AU28": "Are the lips sucked in",
    "AU43": "Are the eyes closed",
}


@dataclass
class VQAConfig:
    q1: bool = True  # one Q1 pair per image that has an emotion label and a fused caption
    q1_paraphrase: bool = True  # train questions drawn from Q1_QUESTIONS; eval always canonical
    q2_per_image: int = 2  # Q2 pairs per image (regions with at least one annotated AU)
    q3_per_image: int = 4  # Q3 pairs per training image at most, yes / no as q3_absent_per_present says
    q3_absent_per_present: float = 1.0  # training Q3 "no" pairs per "yes" pair (1 = balanced). Test faces
    #   show each AU far less often than half the time: the yes/no prior the model learns is set here
    q3_all_in_eval: bool = True  # eval splits ask one Q3 per annotated AU (for per-AU F1)
    emotion_question: bool = True  # "What emotion does this face show?" -> "happiness"
    emotion_per_image: int = 1  # emotion pairs per training image, each a different paraphrase (at most
    #   len(EMOTION_QUESTIONS)); eval splits ask once, canonically. A one-word answer is a tiny share of a
    #   per-token loss next to Q1 descriptions: repeating it is how to give emotion more of the gradient
    heldout_aus: list[str] = field(default_factory=list)  # never asked in train Q3 (zero-shot)
    q3_templates: list[str] = field(default_factory=lambda: list(Q3_QUESTIONS))  # Q3 question forms, one
    #   drawn uniformly per pair (list a form twice to draw it twice as often); fields {state} {name}
    #   {noun} {np} (format_q3). The embedded default asks the action in the captions' own words, which
    #   is learned far faster than an AU number (see configs/default.yaml)
    train_splits: list[str] = field(default_factory=lambda: ["train"])  # splits that hold out AUs

    def validate(self) -> None:
        for au in self.heldout_aus:
            if au not in AUS:
                raise ValueError(f"vqa.heldout_aus: unknown action unit {au!r}")
        if self.q2_per_image < 0 or self.q3_per_image < 0:
            raise ValueError("vqa.q2_per_image and vqa.q3_per_image must be >= 0")
        if not self.q3_absent_per_present > 0:
            raise ValueError(f"vqa.q3_absent_per_present must be > 0, got {self.q3_absent_per_present}")
        if not 1 <= self.emotion_per_image <= len(EMOTION_QUESTIONS):
            raise ValueError(f"vqa.emotion_per_image must be in 1..{len(EMOTION_QUESTIONS)} (one per paraphrase), "
                             f"got {self.emotion_per_image}; emotion_question: false turns the question off")
        if not self.q3_templates:
            raise ValueError("vqa.q3_templates is empty")
        for t in self.q3_templates:
            try:
                t.format(state="s", name="n", noun="o", np="p")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"vqa.q3_templates: {t!r} is not a template over {{state}} {{name}} {{noun}} {{np}}: "
                                 f"{e!r}") from None


def record_rng(seed: int, record_id: str, purpose: str) -> random.Random:
    """A generator that depends only on (seed, record, purpose)."""
    return random.Random(f"{seed}:{purpose}:{record_id}")


def emotion_answer(record: Record) -> str | None:
    """What the emotion question answers: the record's emotion, or both emotions of a compound expression
    (RAF-DB compound: "happiness and surprise"); None when it has neither."""
    if record.emotion is not None:
        return record.emotion
    compound = record.meta.get("emotions")
    return text_rules.join_list(list(compound)) if compound else None


def q1_pairs(record: Record, cfg: VQAConfig, rng: random.Random, *, train: bool) -> list[VQAPair]:
    answer = record.captions.get("fused")
    if not cfg.q1 or emotion_answer(record) is None or not answer:
        return []
    question = rng.choice(Q1_QUESTIONS) if train and cfg.q1_paraphrase else Q1_CANONICAL
    return [VQAPair("q1", question, answer)]


def q2_pairs(record: Record, cfg: VQAConfig, rng: random.Random) -> list[VQAPair]:
    """Regions with an active AU first (at most half when neutral regions exist), then neutral."""
    active, neutral = [], []
    for region in REGIONS:
        labels = text_rules.region_aus(region, record.aus)
        if labels:  # only regions we can answer for: some AU there is annotated
            (active if any(labels.values()) else neutral).append(region)
    rng.shuffle(active)
    rng.shuffle(neutral)
    k = min(cfg.q2_per_image, len(active) + len(neutral))
    n_active = min(len(active), max(k - len(neutral), (k + 1) // 2))
    chosen = active[:n_active] + neutral[:k - n_active]
    pairs = []
    for region in chosen:
        answer = record.captions.get(f"region:{region}") or text_rules.region_description(
            region, record.aus, rng, intensities=record.intensities)
        question = rng.choice(Q2_QUESTIONS).format(region=region)
        pairs.append(VQAPair("q2", question, answer, region=region))
    return pairs


def q3_question(au: str, rng: random.Random, templates=Q3_QUESTIONS) -> str:
    return format_q3(rng.choice(templates), au)


def format_q3(template: str, au: str) -> str:
    """A Q3 question of `template` about `au`: fields {state} (the action as a question, QUESTION_STATE),
    {name} ("AU1"), {noun} (the FACS noun) and {np} (the captions' first noun phrase for it, e.g.
    "raised inner eyebrows": the words of the descriptions, never asked as a question in training)."""
    np_ = PARAPHRASES[au]["np"][0].format(adv="")
    return template.format(state=QUESTION_STATE[au], name=au, noun=AUS[au].noun, np=np_)


# Q3 wordings built on the captions' noun phrases, and the ones the evaluation asks besides the trained
# ones (evaluation/vqa.py `wording_metrics`: every form here that the training split never asked).
Q3_PARAPHRASES = (
    "Does the face show {np}?",
    "Can you see {np} on this face?",
    "Does this face show {name} ({noun})?",
    "Is {name} ({noun}) present in this face?",
)


def q3_pairs(record: Record, cfg: VQAConfig, rng: random.Random, *, train: bool) -> list[VQAPair]:
    """Yes/no pairs; train: balanced and without held-out AUs; eval: every annotated AU."""
    heldout = set(cfg.heldout_aus) if train else set()
    candidates = [au for au in sort_aus(record.aus) if au not in heldout]
    if not train and cfg.q3_all_in_eval:
        chosen = candidates
    else:
        pos = [au for au in candidates if record.aus[au]]
        neg = [au for au in candidates if not record.aus[au]]
        rng.shuffle(pos)
        rng.shuffle(neg)
        r = cfg.q3_absent_per_present
        n = min(int(cfg.q3_per_image / (1 + r)), len(pos), int(len(neg) / r))  # "yes" pairs
        chosen = pos[:n] + neg[:round(n * r)]
        if n == 0 and cfg.q3_per_image > 0 and (pos or neg):
            chosen = (pos or neg)[:1]  # one-sided image (e.g. neutral face): still ask once
    return [VQAPair("q3", q3_question(au, rng, cfg.q3_templates), "yes" if record.aus[au] else "no", au=au)
            for au in chosen]


def emotion_pairs(record: Record, cfg: VQAConfig, rng: random.Random, *, train: bool) -> list[VQAPair]:
    answer = emotion_answer(record)
    if not cfg.emotion_question or answer is None:
        return []
    if not train:
        return [VQAPair("emotion", EMOTION_QUESTIONS[0], answer)]
    if cfg.emotion_per_image == 1:  # one paraphrase, drawn as before (keeps the RNG stream of existing data)
        return [VQAPair("emotion", rng.choice(EMOTION_QUESTIONS), answer)]
    return [VQAPair("emotion", q, answer) for q in rng.sample(EMOTION_QUESTIONS, cfg.emotion_per_image)]


def make_vqa(record: Record, cfg: VQAConfig, *, seed: int) -> list[VQAPair]:
    """All VQA pairs of one record (Q1, Q2, Q3, emotion), validated."""
    train = record.split in cfg.train_splits
    rng = record_rng(seed, record.id, "vqa")
    pairs = (q1_pairs(record, cfg, rng, train=train) + q2_pairs(record, cfg, rng)
             + q3_pairs(record, cfg, rng, train=train) + emotion_pairs(record, cfg, rng, train=train))
    for p in pairs:
        p.validate()
    return pairs


def add_vqa(record: Record, cfg: VQAConfig, *, seed: int) -> Record:
    """`record` with its `vqa` list replaced by freshly built pairs (the record is modified)."""
    record.vqa = make_vqa(record, cfg, seed=seed)
    return record.validate()
