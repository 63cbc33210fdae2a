"""How action units are said in words, and which AUs a free-text description mentions.

`PARAPHRASES` is the verb / noun phrase table every generator says an AU with (the rule-based
captions of synthesis/text_rules.py, VL-FAU's local sentences); `find_aus` reads them back, for
scoring generated descriptions and explanations.

The recogniser is our own design (neither paper publishes one): each AU is recognised by (body part, action) pairs
in either order with at most three plain words between them ("raises the inner eyebrows",
"inner brows are slightly raised"), by stand-alone words ("frown", "dimple", "squint"), by its
FACS noun ("lip corner puller") and by a literal "AU12". A gap never crosses punctuation or a
conjunction, and never swallows a side/part modifier ("inner", "upper", "corner"), so "raised
cheeks and lowered brows" is AU4 + AU6 but not a brow raise. A mention preceded (within three
words of its clause) or interrupted by a negation ("not raised", "without raising", "no frown")
does not count. Checked against every phrase of `PARAPHRASES` and the Exp-BLIP paper's verb forms
(tests/vocab/test_phrases.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from expvl.vocab.facs import AUS, sort_aus

# ---------------------------------------------------------------------------- saying an AU

# Fluent paraphrases per AU. "np" phrases fit "The face shows <np>"; "vp" phrases fit
# "The person <vp>". "{adv}" takes an intensity adverb ("slightly ") or nothing. Every phrase here
# must be recognised by `find_aus` below (tests/vocab/test_phrases.py checks all of them).
PARAPHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "AU1": {"np": ("{adv}raised inner eyebrows", "{adv}lifted inner brows"),
            "vp": ("{adv}raises the inner eyebrows", "{adv}lifts the inner brows")},
    "AU2": {"np": ("{adv}raised outer eyebrows", "{adv}lifted outer brows"),
            "vp": ("{adv}raises the outer eyebrows", "{adv}lifts the outer brows")},
    "AU4": {"np": ("{adv}lowered brows", "{adv}furrowed eyebrows"),
            "vp": ("{adv}lowers the brows", "{adv}furrows the eyebrows")},
    "AU5": {"np": ("{adv}raised upper eyelids", "{adv}widened eyes"),
            "vp": ("{adv}raises the upper eyelids", "{adv}widens the eyes")},
    "AU6": {"np": ("{adv}raised cheeks", "{adv}lifted cheeks"),
            "vp": ("{adv}raises the cheeks", "{adv}lifts the cheeks")},
    "AU7": {"np": ("{adv}tightened eyelids", "{adv}narrowed eyes"),
            "vp": ("{adv}tightens the eyelids", "{adv}narrows the eyes")},
    "AU8": {"np": ("lips {adv}drawn toward each other",),
            "vp": ("{adv}pulls the lips toward each other",)},
    "AU9": {"np": ("a {adv}wrinkled nose",), "vp": ("{adv}wrinkles the nose",)},
    "AU10": {"np": ("a {adv}raised upper lip",), "vp": ("{adv}raises the upper lip",)},
    "AU11": {"np": ("{adv}deepened nasolabial folds",), "vp": ("{adv}deepens the nasolabial folds",)},
    "AU12": {"np": ("lip corners {adv}pulled upward", "{adv}raised lip corners"),
             "vp": ("{adv}pulls the lip corners upward", "{adv}pulls up the corners of the mouth")},
    "AU14": {"np": ("{adv}tightened lip corners", "{adv}dimpled mouth corners"),
             "vp": ("{adv}tightens the lip corners", "{adv}dimples the corners of the mouth")},
    "AU15": {"np": ("{adv}depressed lip corners", "{adv}lowered lip corners"),
             "vp": ("{adv}depresses the lip corners", "{adv}lowers the lip corners")},
    "AU16": {"np": ("a {adv}depressed lower lip", "a lower lip {adv}pulled down"),
             "vp": ("{adv}depresses the lower lip", "{adv}pulls the lower lip down")},
    "AU17": {"np": ("a {adv}raised chin", "a {adv}pushed-up chin"),
             "vp": ("{adv}raises the chin", "{adv}pushes the chin up")},
    "AU18": {"np": ("{adv}puckered lips",), "vp": ("{adv}puckers the lips",)},
    "AU19": {"np": ("a tongue {adv}sticking out",), "vp": ("{adv}sticks the tongue out",)},
    "AU20": {"np": ("{adv}stretched lips", "lips {adv}stretched sideways"),
             "vp": ("{adv}stretches the lips", "{adv}stretches the lips sideways")},
    "AU21": {"np": ("a {adv}tightened neck",), "vp": ("{adv}tightens the neck",)},
    "AU22": {"np": ("{adv}funneled lips",), "vp": ("{adv}funnels the lips",)},
    "AU23": {"np": ("{adv}tightened lips",), "vp": ("{adv}tightens the lips",)},
    "AU24": {"np": ("{adv}pressed lips", "lips {adv}pressed together"),
             "vp": ("{adv}presses the lips together",)},
    "AU25": {"np": ("{adv}parted lips", "lips {adv}apart"),
             "vp": ("{adv}parts the lips", "{adv}separates the lips")},
    "AU26": {"np": ("a {adv}dropped jaw", "a jaw {adv}dropped open"), "vp": ("{adv}drops the jaw",)},
    "AU27": {"np": ("a {adv}stretched mouth", "a mouth {adv}stretched wide open"),
             "vp": ("{adv}stretches the mouth wide open",)},
    "AU28": {"np": ("{adv}sucked-in lips",), "vp": ("{adv}sucks the lips in",)},
    "AU43": {"np": ("{adv}closed eyes", "eyes {adv}shut"), "vp": ("{adv}closes the eyes",)},
}

def intensity_adverb(intensity: float | None) -> str:
    """FACS intensity 0-5 (A=1 ... E=5) -> "slightly " / "clearly " / "strongly " / ""."""
    if intensity is None or intensity <= 0:
        return ""
    if intensity < 2.0:  # A, B: trace / slight
        return "slightly "
    if intensity < 3.5:  # C: marked
        return "clearly "
    return "strongly "  # D, E: severe / maximum


# ---------------------------------------------------------------------------- vocabulary

BROW = r"(?:eye)?brows?"
LIPCORNER = r"(?:lip corners?|mouth corners?|corners? of the (?:mouth|lips?))"
LIPS = r"lips?(?!\s+corners?)"  # "lip corner" belongs to AU12/14/15, not to lip-level AUs
RAISE = r"(?:rais(?:e|es|ed|ing)|lift(?:s|ed|ing)?|elevat(?:e|es|ed|ing)|arch(?:es|ed|ing)?)"
TIGHTEN = r"(?:tighten(?:s|ed|ing)?|tense[sd]?|tensing)"
LOWER = r"(?:lower(?:s|ed|ing)?)"
DEPRESS = r"(?:depress(?:es|ed|ing)?)"

# (subject, action) pairs per AU, matched in both orders. The first group is a generic brow
# raise that names no side: it counts for both AU1 and AU2.
PAIRS: dict[str, list[tuple[str, str]]] = {
    "AU1": [(r"inner " + BROW, RAISE), (r"inner and outer " + BROW, RAISE),
            (r"inner corners of the " + BROW, RAISE)],
    "AU2": [(r"(?:inner and )?outer " + BROW, RAISE), (r"outer corners of the " + BROW, RAISE)],
    "AU4": [(BROW, LOWER + r"|furrow(?:s|ed|ing)?|knit(?:s|ted|ting)?|drawn together"
             r"|draw(?:s|ing)? together|pull(?:s|ed|ing)? (?:down|together)")],
    "AU5": [(r"upper (?:eye)?lids?", RAISE), (r"eyes", r"widen(?:s|ed|ing)?|wide open|opened wide")],
    "AU6": [(r"cheeks?", RAISE)],
    "AU7": [(r"(?:eye)?lids?", TIGHTEN + r"|narrow(?:s|ed|ing)?"),
            (r"eyes", r"narrow(?:s|ed|ing)?|squint(?:s|ed|ing)?")],
    "AU9": [(r"nose", r"wrinkl(?:e|es|ed|ing)|scrunch(?:es|ed|ing)?")],
    "AU10": [(r"upper lip(?!\s+corners?)", RAISE + r"|curl(?:s|ed|ing)? up")],
    "AU11": [(r"nasolabial(?: folds?| furrows?)?", r"deepen(?:s|ed|ing)?")],
    "AU12": [(LIPCORNER, r"pull(?:s|ed|ing)?(?: up(?:ward)?)?|" + RAISE
              + r"|turn(?:s|ed|ing)? up(?:ward)?|curl(?:s|ed|ing)? up")],
    "AU14": [(LIPCORNER, TIGHTEN + r"|dimpl(?:e|es|ed|ing)")],
    "AU15": [(LIPCORNER, DEPRESS + "|" + LOWER + r"|pull(?:s|ed|ing)? down(?:ward)?"
              r"|turn(?:s|ed|ing)? down(?:ward)?|droop(?:s|ed|ing)?")],
    "AU16": [(r"lower lip", DEPRESS + "|" + LOWER + r"|pull(?:s|ed|ing)? down(?:ward)?")],
    "AU17": [(r"chin", RAISE + r"|push(?:es|ed|ing)?(?:[- ]up(?:ward)?)?")],
    "AU18": [(LIPS, r"pucker(?:s|ed|ing)?")],
    "AU19": [(r"tongue", r"stick(?:s|ing)?(?: out)?|stuck out|protrud(?:e|es|ed|ing)|show(?:s|n|ing)?")],
    "AU20": [(LIPS, r"stretch(?:es|ed|ing)?")],
    "AU21": [(r"neck", TIGHTEN)],
    "AU22": [(LIPS, r"funnel(?:s|ed|led|ing|ling)?")],
    "AU23": [(LIPS, TIGHTEN)],
    "AU24": [(LIPS, r"press(?:es|ed|ing)?(?: together)?")],
    "AU25": [(LIPS, r"part(?:s|ed|ing)?|separat(?:e|es|ed|ing)|apart|open(?:s|ed|ing)?")],
    "AU26": [(r"jaw", r"drop(?:s|ped|ping)?|" + LOWER + r"|fall(?:s|en)?|slack(?:ens|ened)?")],
    "AU27": [(r"mouth", r"stretch(?:es|ed|ing)?|wide open|open(?:s|ed)? wide")],
    "AU28": [(LIPS, r"suck(?:s|ed|ing)?(?:[- ]in)?")],
    "AU43": [(r"eyes|(?:eye)?lids", r"clos(?:e|es|ed|ing)|shut(?:s|ting)?")],
}
GENERIC_BROW_RAISE = (r"(?<!inner )(?<!outer )(?<!corners of the )(?<!corner of the )" + BROW, RAISE)

# Whole-pattern cues that do not split into subject + action.
STANDALONE: dict[str, list[str]] = {
    "AU4": [r"frown(?:s|ed|ing)?"],
    "AU5": [r"wide[- ]open(?:ed)? eyes", r"wide[- ]eyed"],
    "AU7": [r"squint(?:s|ed|ing)?"],
    "AU8": [r"lips?(?:\s+[\w-]+){0,2}\s+towards? each other"],
    "AU12": [r"smil(?:e|es|ed|ing)"],
    "AU14": [r"dimpl(?:e|es|ed|ing|er|ers)"],
    "AU15": [r"(?:pull|turn)(?:s|ed|ing)? (?:the )?" + LIPCORNER + r" down(?:ward)?", r"down-?turned"],
    "AU16": [r"pull(?:s|ed|ing)? (?:the )?lower lip down(?:ward)?"],
    "AU18": [r"pucker(?:s|ed|ing)?"],
    "AU22": [r"funnel(?:er|ers|ed|led|ing|ling)"],
}

# A pair match must not be directly followed by these (the direction decides between AUs).
NOT_AFTER: dict[str, str] = {"AU12": r"\s+down"}

NEGATIONS = {"not", "no", "never", "without", "neither", "nor", "none", "n't", "nothing"}
_GAP_STOP = r"(?:and|or|but|while|with|which|that|inner|outer|upper|lower|corners?)"
_GAP = r"(?:\s+(?!" + _GAP_STOP + r"\b)[\w'-]+){0,3}?\s+"
_CLAUSE_BREAK = re.compile(r"[.,;:!?()\"]")
_WORD = re.compile(r"[\w']+")
_CLAUSE_STOP_WORDS = {"and", "but", "while", "whereas", "although"}


@dataclass(frozen=True)
class Mention:
    au: str
    start: int
    end: int
    text: str
    negated: bool


def _compile_pair(subject: str, action: str) -> list[re.Pattern]:
    s, a = f"(?:{subject})", f"(?:{action})"
    return [re.compile(rf"\b{a}{_GAP}{s}\b", re.IGNORECASE),
            re.compile(rf"\b{s}{_GAP}{a}\b", re.IGNORECASE)]


def _build() -> list[tuple[tuple[str, ...], re.Pattern]]:
    table: list[tuple[tuple[str, ...], re.Pattern]] = []
    for au, pairs in PAIRS.items():
        for subject, action in pairs:
            table += [((au,), p) for p in _compile_pair(subject, action)]
    table += [(("AU1", "AU2"), p) for p in _compile_pair(*GENERIC_BROW_RAISE)]
    for au, pats in STANDALONE.items():
        table += [((au,), re.compile(rf"\b(?:{p})\b", re.IGNORECASE)) for p in pats]
    for au, unit in AUS.items():  # FACS noun ("lip corner puller"), plural allowed
        table.append(((au,), re.compile(rf"\b{re.escape(unit.noun)}s?\b", re.IGNORECASE)))
        table.append(((au,), re.compile(rf"\bAU\s?0*{unit.id}\b", re.IGNORECASE)))
    return table


_TABLE = _build()


def _negated(text: str, start: int, end: int) -> bool:
    """A negation inside the match or among the three words before it in the same clause."""
    inside = {w.lower() for w in _WORD.findall(text[start:end])}
    if inside & NEGATIONS or "n't" in text[start:end].lower():
        return True
    before = _CLAUSE_BREAK.split(text[:start])[-1]
    words = [w.lower() for w in _WORD.findall(before)]
    window: list[str] = []
    for w in reversed(words):
        if w in _CLAUSE_STOP_WORDS or len(window) == 3:
            break
        window.append(w)
    return bool(set(window) & NEGATIONS) or any(w.endswith("n't") for w in window)


def find_mentions(text: str) -> list[Mention]:
    """Every AU mention in `text`, negated ones included (with `negated=True`)."""
    out = []
    for aus, pattern in _TABLE:
        for m in pattern.finditer(text):
            after = text[m.end():]
            if any(au in NOT_AFTER and re.match(NOT_AFTER[au], after, re.IGNORECASE) for au in aus):
                continue
            neg = _negated(text, m.start(), m.end())
            out += [Mention(au, m.start(), m.end(), m.group(0), neg) for au in aus]
    return sorted(out, key=lambda x: (x.start, AUS[x.au].id))


def find_aus(text: str) -> list[str]:
    """AU names (numeric order) that `text` says are present; negated mentions do not count."""
    return sort_aus(m.au for m in find_mentions(text) if not m.negated)


@dataclass(frozen=True)
class TextAUScore:
    """Agreement of a text with AU labels, over the annotated AUs only."""
    true_positive: list[str]
    false_positive: list[str]  # mentioned but labelled 0
    false_negative: list[str]  # labelled 1 but not mentioned
    precision: float  # 1.0 when nothing is mentioned
    recall: float  # 1.0 when nothing is labelled positive


def score_text(text: str, labels: Mapping[str, int]) -> TextAUScore:
    """Compare the AUs a text mentions with occurrence labels; unannotated AUs are ignored."""
    said = set(find_aus(text)) & set(labels)
    positive = {au for au, v in labels.items() if v}
    tp, fp, fn = sort_aus(said & positive), sort_aus(said - positive), sort_aus(positive - said)
    precision = len(tp) / len(said) if said else 1.0
    recall = len(tp) / len(positive) if positive else 1.0
    return TextAUScore(tp, fp, fn, precision, recall)
