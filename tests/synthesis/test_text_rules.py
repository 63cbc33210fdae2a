"""Rule-based captions: the paper's exact template, fluent seeded variants, fusion, regions."""

import random

import pytest

from expvl.synthesis import text_rules as T
from expvl.vocab.facs import AU_NAMES, NO_AU_DESCRIPTION
from expvl.vocab.records import Record


def test_paper_caption_is_exact():
    # Exp-BLIP section 3.1 example, AU10 + AU14 + AU17 + AU24 (any input order / spelling)
    assert T.au_caption_paper(["AU24", "AU10", "17", "au14"]) == (
        "It is a people who raises upper lip, tightens lip corner, raises chin and presses lips.")
    assert T.au_caption_paper(["AU12"]) == "It is a people who pulls lip corner."
    assert T.au_caption_paper(["AU1", "AU2"]) == "It is a people who raises inner eyebrow and raises outer eyebrow."
    assert T.au_caption_paper([]) is None  # the paper makes no rule caption without an active AU


def test_join_and_emotion_captions():
    assert T.join_list(["a"]) == "a"
    assert T.join_list(["a", "b", "c"]) == "a, b and c"
    with pytest.raises(ValueError):
        T.join_list([])
    assert T.emotion_caption("happiness") == "The face shows happiness."
    assert T.emotion_caption(["happiness", "surprise"]) == "The face shows happiness and surprise."


def test_no_lower_casing_and_no_word_cut():
    # reference section 9 item 8: the official processor lower-cased and cut at 50 words
    aus = list(AU_NAMES)
    paper = T.au_caption_paper(aus)
    fluent = T.au_caption_fluent(aus, random.Random(0), intensities={a: 4.0 for a in aus})
    for text in (paper, fluent):
        assert len(text.split()) > 50 and text[0].isupper() and text.endswith(".")
    assert paper.count(",") == len(aus) - 2  # every AU is there: nothing was cut


def test_fluent_caption_is_seeded_and_varies():
    aus = ["AU1", "AU6", "AU12", "AU25"]
    a = T.au_caption_fluent(aus, random.Random(3))
    assert a == T.au_caption_fluent(aus, random.Random(3))
    variants = {T.au_caption_fluent(aus, random.Random(s)) for s in range(40)}
    assert len(variants) > 10
    assert T.au_caption_fluent([], random.Random(0)) == NO_AU_DESCRIPTION


def test_intensity_adverbs():
    assert [T.intensity_adverb(i) for i in (None, 0, 1.0, 2.5, 4.5)] == ["", "", "slightly ", "clearly ", "strongly "]
    rng = random.Random(0)
    text = T.au_caption_fluent(["AU12"], rng, intensities={"AU12": 5.0})
    assert "strongly" in text
    text = T.au_caption_fluent(["AU12"], random.Random(0), intensities={"AU12": 1.0})
    assert "slightly" in text


def test_fusion_and_cat():
    rng = random.Random(1)
    fused = T.fused_caption_rule(["AU6", "AU12"], "happiness", rng)
    assert fused.endswith("happiness.") and fused[0].isupper()
    assert "a neutral expression" in T.fused_caption_rule([], "neutral", rng)
    assert T.fused_caption_rule([], "neutral", rng).startswith(NO_AU_DESCRIPTION)
    assert T.cat_caption("A.", "The face shows anger.") == "A. The face shows anger."


def test_region_descriptions():
    aus = {"AU12": 1, "AU25": 1, "AU1": 0, "AU2": 0}
    mouth = T.region_description("mouth", aus, random.Random(0))
    assert mouth.startswith("Around the mouth, the face shows")
    assert T.region_description("brows and forehead", aus, random.Random(0)) == T.NEUTRAL_REGION["brows and forehead"]
    assert set(T.NEUTRAL_REGION) == set(__import__("expvl.vocab.facs", fromlist=["REGIONS"]).REGIONS)


def test_rule_captions_fill_a_valid_record():
    aus = {"AU6": 1, "AU12": 1, "AU4": 0, "AU17": 0}
    caps = T.rule_captions(aus, "happiness", random.Random(0), intensities={"AU6": 2.0, "AU12": 3.0})
    assert caps["au_paper"] == "It is a people who raises cheek and pulls lip corner."
    assert caps["emotion"] == "The face shows happiness."
    assert caps["cat"] == caps["au_rule"] + " " + caps["emotion"]
    assert {k for k in caps if k.startswith("region:")} == {
        "region:eyes and cheeks", "region:mouth", "region:brows and forehead", "region:chin and jaw"}
    Record("x", "x.png", "t", "train", aus=aus, emotion="happiness", captions=caps).validate()
    # neutral face: no paper caption, fixed description, emotion-only record: fused = emotion caption
    caps = T.rule_captions({"AU6": 0}, "neutral", random.Random(0))
    assert "au_paper" not in caps and caps["au_rule"] == NO_AU_DESCRIPTION
    assert T.rule_captions({}, "anger", random.Random(0)) == {
        "emotion": "The face shows anger.", "fused": "The face shows anger."}
