"""The AU phrase matcher: exact on our own generated text, sensible on hand-written sentences."""

import itertools
import random

import pytest

from expvl.synthesis import text_rules as T
from expvl.vocab.facs import AU_NAMES, AUS, NO_AU_DESCRIPTION, sort_aus
from expvl.vocab.phrases import find_aus, find_mentions, score_text


@pytest.mark.parametrize("au", AU_NAMES)
def test_every_paraphrase_and_form_finds_exactly_its_au(au):
    for kind, frame in (("np", "The face shows {}."), ("vp", "The person {}.")):
        for template, adv in itertools.product(T.PARAPHRASES[au][kind], ("", "slightly ", "clearly ", "strongly ")):
            text = frame.format(template.format(adv=adv))
            assert find_aus(text) == [au], text
    unit = AUS[au]
    for text in (T.au_caption_paper([au]), unit.noun, unit.verb, unit.verb_3rd, f"{au} is present."):
        assert find_aus(text) == [au], text


def test_generated_captions_exact_on_random_label_sets():
    rng = random.Random(0)
    for _ in range(600):
        aus = sort_aus(rng.sample(AU_NAMES, rng.randint(1, 7)))
        ints = {a: rng.uniform(0.5, 5) for a in aus}
        texts = [T.au_caption_paper(aus), T.au_caption_fluent(aus, rng, intensities=ints),
                 T.fused_caption_rule(aus, rng.choice(["happiness", "neutral", "fear"]), rng, intensities=ints)]
        labels = {a: int(a in aus) for a in AU_NAMES}
        for region in T.NEUTRAL_REGION:
            if any(AUS[a].region == region for a in aus):
                texts.append(T.region_description(region, labels, rng, intensities=ints))
        for text in texts[:3]:
            assert find_aus(text) == aus, text  # recall 100 % and no false positives
        for text in texts[3:]:
            assert set(find_aus(text)) <= set(aus), text


def test_fixed_and_neutral_texts_mention_nothing():
    assert find_aus(NO_AU_DESCRIPTION) == []  # contains "not raised or furrowed"
    for text in T.NEUTRAL_REGION.values():
        assert find_aus(text) == [], text
    assert find_aus(T.emotion_caption(["happiness", "surprise"])) == []


HAND_WRITTEN = [
    ("She is smiling and her cheeks are raised.", ["AU6", "AU12"]),
    ("Raised eyebrows and a dropped jaw.", ["AU1", "AU2", "AU26"]),
    ("The inner corners of the eyebrows are lifted.", ["AU1"]),
    ("The brows are drawn together and lowered, with the eyes narrowed.", ["AU4", "AU7"]),
    ("raised cheeks and lowered brows", ["AU4", "AU6"]),
    ("Her lip corners are pulled down and the chin is pushed up.", ["AU15", "AU17"]),
    ("The nose is wrinkled and the upper lip curled up.", ["AU9", "AU10"]),
    ("The lips are tightly pressed together.", ["AU24"]),
    ("The eyes are closed; the lips are slightly parted.", ["AU25", "AU43"]),
    ("AU12 and AU 6 are active.", ["AU6", "AU12"]),
    ("A frown and squinting eyes.", ["AU4", "AU7"]),
    ("The mouth is stretched wide open.", ["AU27"]),
    # negation: nothing counts
    ("The inner brows are not raised.", []),
    ("The face shows no frown.", []),
    ("She does not press her lips together.", []),
    ("without raising the outer eyebrows", []),
    ("The eyebrows are neither raised nor lowered.", []),
    # negation is local to its clause
    ("The person does not press the lips together, but the chin is raised.", ["AU17"]),
    ("The lips are not pressed and the cheeks are raised.", ["AU6"]),
]


@pytest.mark.parametrize("text,expected", HAND_WRITTEN)
def test_hand_written_sentences(text, expected):
    assert find_aus(text) == expected


def test_mentions_report_negation_and_score():
    ms = find_mentions("The cheeks are not raised.")
    assert ms and all(m.negated for m in ms) and ms[0].au == "AU6"
    s = score_text("The face shows raised cheeks and a wrinkled nose.", {"AU6": 1, "AU12": 1, "AU9": 0})
    assert (s.true_positive, s.false_positive, s.false_negative) == (["AU6"], ["AU9"], ["AU12"])
    assert s.precision == 0.5 and s.recall == 0.5
    # AUs without a label are ignored: AU25 is mentioned but not annotated
    assert score_text("parted lips", {"AU6": 0}).precision == 1.0
