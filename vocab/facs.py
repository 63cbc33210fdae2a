"""FACS knowledge shared by every part of the project: action units, emotions, prototypes.

Sources: Exp-BLIP supplement Table 1 (the 27 AUs with their FACS noun and the verb phrase of the
rule-based caption generator), EMFACS prototype sets as commonly cited (not from the papers),
and the AU sets of the standard datasets' usual protocols.

AU names are always the strings "AU1" ... "AU43"; `au_name` normalises the spellings that
datasets use ("1", 1, "au01", "AU 1") and raises on anything that is not in the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ActionUnit:
    id: int
    noun: str  # FACS name, used in the GPT one-shot prompt's AU list
    verb: str  # base form used by the rule-based generator ("raise inner eyebrow")
    region: str  # face region, used for Q2 (regional) questions

    @property
    def name(self) -> str:
        return f"AU{self.id}"

    @property
    def verb_3rd(self) -> str:
        """Third-person form of the verb phrase: "raises inner eyebrow", "presses lips"."""
        head, _, rest = self.verb.partition(" ")
        return f"{third_person(head)} {rest}".strip()


def third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


REGIONS = ("brows and forehead", "eyes", "eyes and cheeks", "nose", "nose and cheeks", "mouth",
           "chin and jaw", "neck")

_TABLE = [
    (1, "inner brow raiser", "raise inner eyebrow", "brows and forehead"),
    (2, "outer brow raiser", "raise outer eyebrow", "brows and forehead"),
    (4, "brow lowerer", "lower brow", "brows and forehead"),
    (5, "upper lid raiser", "raise upper lid", "eyes"),
    (6, "cheek raiser", "raise cheek", "eyes and cheeks"),
    (7, "lid tightener", "tighten lids", "eyes"),
    (8, "lips toward each other", "pull lips toward each other", "mouth"),
    (9, "nose wrinkler", "wrinkle nose", "nose"),
    (10, "upper lip raiser", "raise upper lip", "mouth"),
    (11, "nasolabial deepener", "deepen nasolabial", "nose and cheeks"),
    (12, "lip corner puller", "pull lip corner", "mouth"),
    (14, "dimpler", "tighten lip corner", "mouth"),
    (15, "lip corner depressor", "depress lip corner", "mouth"),
    (16, "lower lip depressor", "depress lower lip", "mouth"),
    (17, "chin raiser", "raise chin", "chin and jaw"),
    (18, "lip pucker", "pucker lips", "mouth"),
    (19, "tongue show", "stick tongue out", "mouth"),
    (20, "lip stretch", "stretch lips", "mouth"),
    (21, "neck tightener", "tighten neck", "neck"),
    (22, "lip funneler", "show lip funneler", "mouth"),
    (23, "lip tightener", "tighten lips", "mouth"),
    (24, "lip pressor", "press lips", "mouth"),
    (25, "lips part", "separate lips", "mouth"),
    (26, "jaw drop", "drop jaw", "chin and jaw"),
    (27, "mouth stretch", "stretch mouth", "chin and jaw"),
    (28, "lip suck", "suck lips", "mouth"),
    (43, "eyes closed", "close eyes", "eyes"),
]

AUS: dict[str, ActionUnit] = {f"AU{i}": ActionUnit(i, n, v, r) for i, n, v, r in _TABLE}
AU_NAMES: tuple[str, ...] = tuple(AUS)

# The AUs SynthFACS renders (issue 3: at least these 19, each with a visible cue at 64 px).
SYNTHFACS_AUS: tuple[str, ...] = tuple(
    f"AU{i}" for i in (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 16, 17, 20, 23, 24, 25, 26, 43))

# AffectNet's 8 classes; RAF-DB basic uses the first 7.
EMOTIONS: tuple[str, ...] = ("neutral", "happiness", "sadness", "anger", "surprise", "fear",
                             "disgust", "contempt")
BASIC_EMOTIONS: tuple[str, ...] = EMOTIONS[:7]

# EMFACS prototypes (commonly cited FACS background, not from the papers). Contempt is
# unilateral: "R" marks AUs that act on one side of the face only.
PROTOTYPES: dict[str, tuple[str, ...]] = {
    "neutral": (),
    "happiness": ("AU6", "AU12"),
    "sadness": ("AU1", "AU4", "AU15"),
    "surprise": ("AU1", "AU2", "AU5", "AU26"),
    "fear": ("AU1", "AU2", "AU4", "AU5", "AU7", "AU20", "AU26"),
    "anger": ("AU4", "AU5", "AU7", "AU23"),
    "disgust": ("AU9", "AU15", "AU16"),
    "contempt": ("AU12", "AU14"),
}
UNILATERAL_PROTOTYPES: frozenset[str] = frozenset({"contempt"})

DATASET_AUS: dict[str, tuple[str, ...]] = {
    "bp4d": tuple(f"AU{i}" for i in (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)),
    "disfa": tuple(f"AU{i}" for i in (1, 2, 4, 6, 9, 12, 25, 26)),
    "disfa12": tuple(f"AU{i}" for i in (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)),
    "gft": tuple(f"AU{i}" for i in (1, 2, 4, 6, 10, 12, 14, 15, 23, 24)),
    "rafau": tuple(f"AU{i}" for i in (1, 2, 4, 5, 6, 9, 10, 12, 16, 17, 25, 26, 27)),
    "emotionet": tuple(f"AU{i}" for i in (1, 2, 4, 5, 6, 9, 12, 17, 20, 25, 26)),
    "synthfacs": SYNTHFACS_AUS,
}

# Fixed description used when no AU is active (Exp-BLIP supplement 1.2).
NO_AU_DESCRIPTION = (
    "The eyes may be open and looking straight ahead, with the mouth closed or slightly open "
    "in a relaxed position. The forehead may be relatively smooth with minimal wrinkles or "
    "creases. The eyebrows may be in a natural position, not raised or furrowed.")

_AU_RE = re.compile(r"^\s*(?:au)?\s*0*(\d+)\s*$", re.IGNORECASE)


def au_name(value: str | int) -> str:
    """Normalise an AU spelling ("1", 1, "au01", "AU 1") to "AU1"; unknown AUs raise."""
    m = _AU_RE.match(str(value))
    if not m or f"AU{int(m.group(1))}" not in AUS:
        raise KeyError(f"unknown action unit {value!r}; known: {', '.join(AU_NAMES)}")
    return f"AU{int(m.group(1))}"


def emotion_name(value: str) -> str:
    """Normalise an emotion label ("Happy", "happiness", "SAD") to the names in EMOTIONS."""
    key = value.strip().lower()
    key = _EMOTION_ALIASES.get(key, key)
    if key not in EMOTIONS:
        raise KeyError(f"unknown emotion {value!r}; known: {', '.join(EMOTIONS)}")
    return key


_EMOTION_ALIASES = {
    "happy": "happiness", "joy": "happiness", "sad": "sadness", "angry": "anger",
    "surprised": "surprise", "fearful": "fear", "afraid": "fear", "disgusted": "disgust",
    "contemptuous": "contempt", "neutrality": "neutral",
}


def sort_aus(names) -> list[str]:
    """AU names in numeric order, duplicates removed."""
    return sorted({au_name(n) for n in names}, key=lambda n: AUS[n].id)
