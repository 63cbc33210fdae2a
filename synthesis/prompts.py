"""The caption prompts sent to the LLM, and the checks its replies must pass.

Exp-BLIP (BMVC 2023) Fig. 2 (one-shot AU prompt) and Fig. 4 (zero-shot fusion prompt) verbatim,
the AUs named by supplement Table 1's FACS nouns. The layout of the 27-AU list that heads the AU
prompt is not published ("<List all 27 Action Units (AUs) defined by FACS>"); we
write one "AU1: inner brow raiser" line per AU. The regional (Exp-VQA Q2) prompt is OUR OWN: the
paper's is unknown. A reply that mentions an AU, names an emotion when told not to, is empty or
is too long is rejected (`check_reply`); synthesis/llm_text.py asks again, then falls back to
the rule-based text.
"""

from __future__ import annotations

import re

from expvl.vocab.facs import AUS, sort_aus

# ---------------------------------------------------------------------------- prompts

def au_list_text() -> str:
    return "\n".join(f"{name}: {au.noun}" for name, au in AUS.items())


_AU_QUESTION = ("Describe briefly the facial actions or status of a face which contains {aus} in 1-9 "
                "sentences. Do not describe the emotion or facial expressions, and do not mention 'AU' "
                "in the reply.")


def au_prompt(aus) -> str:
    """Exp-BLIP Fig. 2: one-shot AU description prompt for the active AUs `aus`."""
    return (f"{au_list_text()}\n"
            "You are currently acting as an AU description expert, and you should answer questions "
            "according to this example:\n"
            f"Question: \"{_AU_QUESTION.format(aus='AU2, AU4, AU9, AU20, AU25')}\"\n"
            "Answer: \"The face shows the outer eyebrows raised, forehead wrinkles, a wrinkled nose, "
            "a stretched lip, and either parted lips or a dropped jaw.\"\n"
            f"Question: {_AU_QUESTION.format(aus=', '.join(sort_aus(aus)))}\n"
            "Answer:")


def fusion_prompt(au_caption: str, emotion_caption: str) -> str:
    """Exp-BLIP Fig. 4: zero-shot fusion of an AU caption and an emotion caption."""
    return ("Combine the facial action sentence with the emotion sentence. This combined sentence "
            "should describe all the facial actions and emotions mentioned in these two sentences by "
            "pointing out how each emotion is inferred from the corresponding facial actions.\n"
            f"Facial Action Sentence: \"{au_caption}\"\n"
            f"Emotion Sentence: \"{emotion_caption}\"")


def region_prompt(region: str, aus) -> str:
    """OUR prompt (not from the papers) for a Q2 regional description of the active AUs `aus`."""
    return (f"{au_list_text()}\n"
            "You are currently acting as an AU description expert.\n"
            f"Question: Describe briefly the facial actions in the {region} region of a face which "
            f"contains {', '.join(sort_aus(aus))} in 1-2 sentences. Describe only the {region}. Do not "
            "describe the emotion or facial expressions, and do not mention 'AU' in the reply.\n"
            "Answer:")


# ---------------------------------------------------------------------------- reply checks

_AU_MENTION = re.compile(r"\bAUs?\b|\bAU\s?\d+|action units?", re.IGNORECASE)
EMOTION_WORDS = ("happiness", "happy", "sadness", "sad", "anger", "angry", "surprise", "surprised",
                 "fear", "fearful", "afraid", "scared", "disgust", "disgusted", "contempt",
                 "contemptuous", "joy", "joyful", "emotion", "emotions", "emotional")
_EMOTION = re.compile(r"\b(?:" + "|".join(EMOTION_WORDS) + r")\b", re.IGNORECASE)


def check_reply(text: str | None, *, forbid_emotion: bool, max_words: int) -> str | None:
    """None for an acceptable reply, else the reason it is rejected."""
    if text is None or not text.strip():
        return "empty"
    if _AU_MENTION.search(text):
        return "mentions AU"
    if forbid_emotion and _EMOTION.search(text):
        return "names an emotion"
    if len(text.split()) > max_words:
        return "too long"
    return None
