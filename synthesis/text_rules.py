"""Rule-based caption synthesis: Exp-BLIP's templates plus a fluent, seeded variant.

Implements Exp-BLIP (BMVC 2023) section 3 / supplement 1: the rule-based AU caption
("It is a people who raises upper lip, tightens lip corner, raises chin and presses lips."),
the emotion caption ("The face shows happiness and surprise."), the fixed description used when
no AU is active, and a rule-based stand-in for the GPT fusion step (Cat-BLIP concatenation and a
fluent "..., which suggests happiness." variant) so the pipeline runs without an LLM endpoint.
Regional (Exp-VQA Q2) descriptions are our own design: the paper's Q2 answers are unknown.
Checked against the Exp-BLIP paper (§3, Fig. 2) and supplement (Table 1's verb forms, §1.2's no-AU
description), and against what the Exp-VQA repository shows of its question types.

Unlike the official `blip_caption` processor, which lower-cases text and cuts it at 50 words, we
do neither. Every random choice takes an explicit `random.Random`, so a
caption depends only on the seed and the record, not on the order records are processed in.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

from expvl.vocab.facs import AUS, NO_AU_DESCRIPTION, REGIONS, sort_aus
from expvl.vocab.phrases import PARAPHRASES, intensity_adverb

# Sentence frames of the fluent AU caption; "{np}" / "{vp}" receive the joined phrase list.
NP_FRAMES = ("The face shows {np}.", "This person has {np}.", "In this face we can see {np}.")
VP_FRAMES = ("The person {vp}.", "This person {vp}.")

# Q2 answers for a region whose annotated AUs are all inactive (our wording; it must not
# mention any AU action, which tests/vocab/test_phrases.py checks).
NEUTRAL_REGION = {
    "brows and forehead": "The eyebrows rest in a natural position and the forehead is smooth.",
    "eyes": "The eyes are open and relaxed.",
    "eyes and cheeks": "The eyes are open and the cheeks are relaxed.",
    "nose": "The nose is smooth and relaxed.",
    "nose and cheeks": "The nose and cheeks are smooth and relaxed.",
    "mouth": "The lips are relaxed and the mouth is at rest.",
    "chin and jaw": "The chin and jaw are relaxed.",
    "neck": "The neck is relaxed.",
}


def join_list(items: list[str]) -> str:
    """"a", "a and b", "a, b and c" (Exp-BLIP's joining; no Oxford comma)."""
    if not items:
        raise ValueError("cannot join an empty list")
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def active_aus(aus: Mapping[str, int]) -> list[str]:
    """Positive AUs in FACS numeric order."""
    return sort_aus(au for au, v in aus.items() if v)


# --------------------------------------------------------------------------- AU captions

def au_caption_paper(aus: Iterable[str]) -> str | None:
    """Exp-BLIP's rule-based AU caption, exactly; None when no AU is active (as in the paper)."""
    names = sort_aus(aus)
    if not names:
        return None
    return "It is a people who " + join_list([AUS[a].verb_3rd for a in names]) + "."


def au_phrases(aus: Iterable[str], rng: random.Random, *, kind: str = "np",
               intensities: Mapping[str, float] | None = None) -> list[str]:
    """One seeded paraphrase per AU ("np" or "vp" form), with intensity adverbs when given."""
    intensities = intensities or {}
    out = []
    for au in sort_aus(aus):
        template = rng.choice(PARAPHRASES[au][kind])
        out.append(template.format(adv=intensity_adverb(intensities.get(au))))
    return out


def au_caption_fluent(aus: Iterable[str], rng: random.Random, *,
                      intensities: Mapping[str, float] | None = None) -> str:
    """A fluent, paraphrased AU caption; the fixed no-AU description when nothing is active."""
    names = sort_aus(aus)
    if not names:
        return NO_AU_DESCRIPTION
    if rng.random() < 0.5:
        frame = rng.choice(NP_FRAMES)
        return frame.format(np=join_list(au_phrases(names, rng, kind="np", intensities=intensities)))
    frame = rng.choice(VP_FRAMES)
    return frame.format(vp=join_list(au_phrases(names, rng, kind="vp", intensities=intensities)))


# --------------------------------------------------------------------------- emotion + fusion

def emotion_caption(emotions: str | Iterable[str]) -> str:
    """"The face shows happiness." / "The face shows happiness and surprise." (Exp-BLIP)."""
    names = [emotions] if isinstance(emotions, str) else list(emotions)
    return f"The face shows {join_list(names)}."


def _emotion_phrase(emotion: str) -> str:
    # "suggests neutral" is not English; every other label is an abstract noun.
    return "a neutral expression" if emotion == "neutral" else emotion


def cat_caption(au_text: str, emotion_text: str) -> str:
    """Cat-BLIP's ablation: the AU caption and the emotion caption concatenated."""
    return f"{au_text} {emotion_text}"


def fused_caption_rule(aus: Iterable[str], emotion: str, rng: random.Random, *,
                       intensities: Mapping[str, float] | None = None) -> str:
    """Rule-based stand-in for the GPT fusion: "<actions>, which suggests <emotion>."."""
    names = sort_aus(aus)
    if not names:
        return f"{NO_AU_DESCRIPTION} This suggests {_emotion_phrase(emotion)}."
    nps = join_list(au_phrases(names, rng, kind="np", intensities=intensities))
    lead = rng.choice(("The face shows", "This person has"))
    link = rng.choice(("which suggests", "which indicates", "pointing to"))
    return f"{lead} {nps}, {link} {_emotion_phrase(emotion)}."


# --------------------------------------------------------------------------- regions (Q2)

def region_aus(region: str, aus: Mapping[str, int]) -> dict[str, int]:
    """The annotated AUs of `aus` that belong to `region`."""
    return {au: v for au, v in aus.items() if AUS[au].region == region}


def region_description(region: str, aus: Mapping[str, int], rng: random.Random, *,
                       intensities: Mapping[str, float] | None = None) -> str:
    """Q2 answer: the active AUs of one region as fluent phrases, or the region's neutral text."""
    active = active_aus(region_aus(region, aus))
    if not active:
        return NEUTRAL_REGION[region]
    nps = join_list(au_phrases(active, rng, kind="np", intensities=intensities))
    return f"Around the {region}, the face shows {nps}."


# --------------------------------------------------------------------------- one record

def rule_captions(aus: Mapping[str, int], emotion: str | list[str] | None, rng: random.Random, *,
                  intensities: Mapping[str, float] | None = None,
                  regions: bool = True) -> dict[str, str]:
    """Every rule-based caption kind a record's labels allow (see records.CAPTION_KINDS).

    au_paper only when an AU is active (as in the paper); au_rule falls back to the fixed
    no-AU description; cat needs both AU labels and an emotion. `fused` is the whole description the
    labels allow: the AU and emotion captions fused, or the one of them a record has (an emotion-only
    or an AU-only dataset), since there is nothing to fuse it with.
    """
    out: dict[str, str] = {}
    active = active_aus(aus)
    if active:
        out["au_paper"] = au_caption_paper(active)
    if aus:
        out["au_rule"] = au_caption_fluent(active, rng, intensities=intensities)
    if emotion is not None:
        out["emotion"] = emotion_caption(emotion)
        if aus:
            out["cat"] = cat_caption(out["au_rule"], out["emotion"])
            out["fused"] = fused_caption_rule(active, emotion, rng, intensities=intensities)
        else:
            out["fused"] = out["emotion"]
    elif aus:
        out["fused"] = out["au_rule"]
    if regions:
        for region in REGIONS:
            if region_aus(region, aus):
                out[f"region:{region}"] = region_description(region, aus, rng, intensities=intensities)
    return out
