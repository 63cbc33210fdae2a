"""Evaluation metrics: AU detection F1, emotion accuracy, caption similarity, AU faithfulness.

Exp-BLIP §4.1: AU detection is the F1 of the positive class per AU (reported x100) and its mean
over AUs; emotion is top-1 accuracy; captions are scored against every reference of a sample and
the MAXIMUM is kept (each face has GPT and rule-based references), then averaged over samples.
Exp-VQA's Q3 scoring is not published; our reconstruction: the first word of a generated answer is
read as yes/no and anything else counts as "no" (and is counted, so a model that rambles shows).

Checked against: torchmetrics 1.9 (MultilabelStatScores, MulticlassConfusionMatrix,
rouge_score, bleu_score) and pycocoevalcap 1.2 `meteor/meteor.py` (the METEOR 1.5 jar driven
over stdio), with hand-computed cases in tests/evaluation/test_metrics.py. Every number returned
is a plain Python float in [0, 1]; the report multiplies by 100.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix, MultilabelStatScores
from torchmetrics.functional.text import bleu_score, rouge_score

from expvl.vocab.facs import EMOTIONS, au_name

# ------------------------------------------------------------------------------ answer parsing

_FIRST_WORD = re.compile(r"^[\W_]*(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> int | None:
    """1 for an answer whose first word is "yes", 0 for "no", None for anything else."""
    m = _FIRST_WORD.match(text or "")
    return None if m is None else int(m.group(1).lower() == "yes")


# Words that name each emotion of vocab.facs.EMOTIONS. "relaxed" is left out on purpose:
# descriptions of any face say "mouth in a relaxed position" (facs.NO_AU_DESCRIPTION).
EMOTION_WORDS: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral", "calm", "expressionless", "neutrality"),
    "happiness": ("happiness", "happy", "joy", "joyful", "delighted", "cheerful", "amused"),
    "sadness": ("sadness", "sad", "unhappy", "sorrow", "sorrowful", "upset", "gloomy"),
    "anger": ("anger", "angry", "furious", "annoyed", "irritated", "rage"),
    "surprise": ("surprise", "surprised", "astonished", "astonishment", "amazed", "shocked"),
    "fear": ("fear", "fearful", "afraid", "scared", "frightened", "terrified", "anxious"),
    "disgust": ("disgust", "disgusted", "revulsion", "repulsed"),
    "contempt": ("contempt", "contemptuous", "disdain", "scorn", "scornful"),
}
_NEGATIONS = {"not", "no", "never", "without", "neither", "nor", "hardly"}
_CLAUSE_BREAK = re.compile(r"[.,;:!?()\"]|\b(?:but|while|whereas|although|rather)\b", re.IGNORECASE)


def _negated(text: str, start: int) -> bool:
    """A negation among the three words before `start`, inside the same clause."""
    words = re.findall(r"[\w']+", _CLAUSE_BREAK.split(text[:start])[-1].lower())[-3:]
    return any(w in _NEGATIONS or w.endswith("n't") for w in words)


def parse_emotion(text: str, labels: Sequence[str] = EMOTIONS) -> str | None:
    """The label of `labels` that an answer names first ("looks happy" -> "happiness").

    Synonyms come from EMOTION_WORDS; a label without an entry there is matched literally.
    A negated mention ("not happy", "doesn't look angry") is skipped. None if nothing matches.
    """
    best: tuple[int, str] | None = None
    for label in labels:
        words = sorted(EMOTION_WORDS.get(label, (label,)), key=len, reverse=True)
        pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
        for m in pattern.finditer(text or ""):
            if not _negated(text, m.start()):
                if best is None or m.start() < best[0]:
                    best = (m.start(), label)
                break
    return None if best is None else best[1]


# ------------------------------------------------------------------------------ AU detection

def _distributed() -> bool:
    """Under DDP every rank must call compute() (it all-gathers), even with nothing seen."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class AUMetrics(nn.Module):
    """Per-AU precision / recall / F1 of the positive class, ignoring unannotated entries.

    Datasets annotate different AU subsets, so every entry carries an `annotated` flag; an
    unannotated entry changes no count. The macro average runs over the AUs that have at least
    one annotated positive (F1 is undefined otherwise; those AUs are listed under "skipped").
    `always_yes_f1` is the chance reference: the F1 of answering "yes" to every annotated entry
    of that AU, 2 P / (2 P + N) for P positives and N negatives.
    An nn.Module so that it follows the LightningModule to its device; the counts are
    torchmetrics states and therefore sum across DDP ranks.
    """

    def __init__(self, aus: Sequence[str]):
        super().__init__()
        self.aus = [au_name(a) for a in aus]
        self.index = {a: i for i, a in enumerate(self.aus)}
        self.stats = MultilabelStatScores(num_labels=len(self.aus), average=None, ignore_index=-1)
        self.answers = 0  # yes/no answers seen by update_answers (local to this rank)
        self.unparsed = 0  # ... of which neither "yes" nor "no": counted as "no"

    def update(self, preds: torch.Tensor, targets: torch.Tensor,
               annotated: torch.Tensor | None = None) -> None:
        """preds, targets: (B, A) in {0, 1}; annotated: (B, A) bool, None = all annotated."""
        if preds.shape != targets.shape or preds.dim() != 2 or preds.shape[1] != len(self.aus):
            raise ValueError(f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} must "
                             f"both be (B, {len(self.aus)}) for AUs {self.aus}")
        for name, t in (("preds", preds), ("targets", targets)):
            if not torch.isin(t, torch.tensor([0, 1], device=t.device)).all():
                raise ValueError(f"{name} must be 0/1, got values {t.unique().tolist()}")
        targets = targets.long().clone()
        if annotated is not None:
            targets[~annotated.bool()] = -1  # torchmetrics' ignore_index
        self.stats.update(preds.long(), targets)

    def update_answers(self, aus: Sequence[str], answers: Sequence[str],
                       targets: Sequence[int]) -> None:
        """Q3-style samples: one question about one AU each, answered in free text."""
        if not len(aus) == len(answers) == len(targets):
            raise ValueError(f"aus ({len(aus)}), answers ({len(answers)}) and targets "
                             f"({len(targets)}) must have the same length")
        B, A = len(aus), len(self.aus)
        preds, tgt = torch.zeros(B, A, dtype=torch.long), torch.zeros(B, A, dtype=torch.long)
        annotated = torch.zeros(B, A, dtype=torch.bool)
        for b, (au, answer, target) in enumerate(zip(aus, answers, targets)):
            col = self.index[au_name(au)]
            said = parse_yes_no(answer)
            self.unparsed += said is None
            preds[b, col], tgt[b, col], annotated[b, col] = said or 0, int(target), True
        self.answers += B
        self.update(preds.to(self.stats.tp.device), tgt.to(self.stats.tp.device),
                    annotated.to(self.stats.tp.device))

    def reset(self) -> None:
        self.stats.reset()
        self.answers = self.unparsed = 0

    def compute(self) -> dict:
        if self.stats.update_count == 0 and not _distributed():  # avoid torchmetrics' warning
            tp = fp = tn = fn = [0] * len(self.aus)
        else:
            tp, fp, tn, fn, _sup = self.stats.compute().T.tolist()  # each a list over AUs
        f1, precision, recall, support, always_yes, skipped = {}, {}, {}, {}, {}, []
        for i, au in enumerate(self.aus):
            support[au] = int(tp[i] + fn[i])
            if support[au] == 0:
                skipped.append(au)
                continue
            p = tp[i] / (tp[i] + fp[i]) if tp[i] + fp[i] else 0.0
            r = tp[i] / support[au]
            precision[au], recall[au] = p, r
            f1[au] = 2 * tp[i] / (2 * tp[i] + fp[i] + fn[i])
            always_yes[au] = 2 * support[au] / (2 * support[au] + fp[i] + tn[i])
        mean = (lambda d: sum(d.values()) / len(d) if d else 0.0)
        return {"f1": f1, "macro_f1": mean(f1), "precision": precision, "recall": recall,
                "macro_precision": mean(precision), "macro_recall": mean(recall),
                "support": support, "always_yes_f1": always_yes, "skipped": skipped,
                "answers": self.answers, "unparsed": self.unparsed}


# ------------------------------------------------------------------------------ emotion

class EmotionMetrics(nn.Module):
    """Top-1 accuracy (micro), mean per-class accuracy (macro) and the confusion matrix.

    An unparsed answer is a wrong prediction: internally it is one extra predicted class that
    no target has, so it lowers accuracy without being credited to any label. Micro and macro
    accuracy are both read off the confusion matrix, the one state that is accumulated.
    """

    def __init__(self, labels: Sequence[str] = EMOTIONS):
        super().__init__()
        self.labels = list(labels)
        C = len(self.labels)
        self.confusion = MulticlassConfusionMatrix(num_classes=C + 1)  # column C = unparsed

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """preds: (B,) class index, -1 = unparsed, or (B, C) scores; targets: (B,) index."""
        if preds.dim() == 2:
            preds = preds.argmax(dim=1)
        C = len(self.labels)
        if preds.shape != targets.shape or preds.dim() != 1:
            raise ValueError(f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} must be (B,)")
        if ((targets < 0) | (targets >= C)).any() or ((preds < -1) | (preds >= C)).any():
            raise ValueError(f"indices out of range for {C} labels {self.labels}")
        self.confusion.update(torch.where(preds < 0, C, preds).long(), targets.long())

    def update_answers(self, answers: Sequence[str], targets: Sequence[str]) -> None:
        """Free-text answers (parsed with parse_emotion) against target label names."""
        pred = [parse_emotion(a, self.labels) for a in answers]
        device = self.confusion.confmat.device
        self.update(torch.tensor([-1 if p is None else self.labels.index(p) for p in pred], device=device),
                    torch.tensor([self.labels.index(t) for t in targets], device=device))

    def reset(self) -> None:
        self.confusion.reset()

    def compute(self) -> dict:
        C = len(self.labels)
        if self.confusion.update_count == 0 and not _distributed():  # an empty matrix, no warning
            cm = [[0] * (C + 1) for _ in range(C)]
        else:  # rows = true label, cols = predicted labels + unparsed
            cm = self.confusion.compute()[:C].tolist()
        total = sum(map(sum, cm))
        per_class = {lab: row[i] / sum(row) for i, (lab, row) in enumerate(zip(self.labels, cm)) if sum(row)}
        return {"labels": self.labels,
                "accuracy": sum(cm[i][i] for i in range(C)) / total if total else 0.0,
                "macro_accuracy": sum(per_class.values()) / len(per_class) if per_class else 0.0,
                "per_class_accuracy": per_class,
                "confusion": [row[:C] for row in cm],
                "support": {lab: sum(row) for lab, row in zip(self.labels, cm)},
                "unparsed": sum(row[C] for row in cm), "n": total}


# ------------------------------------------------------------------------------ captions

def _meteor_max(predictions: list[str], references: list[list[str]]) -> list[float] | str:
    """Per-sample max METEOR over references, or the reason it is unavailable."""
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError as e:
        return f"pycocoevalcap not importable ({e}); install the `metrics` extra"
    if shutil.which("java") is None:
        return "java not found on PATH (the METEOR 1.5 jar needs a JRE)"
    # The jar speaks one line per request; a "|||" or a newline inside a text breaks it.
    clean = (lambda s: " ".join(s.replace("|||", " ").split()).lower())
    pairs = {f"{i}:{j}": (clean(p), clean(r)) for i, (p, refs) in enumerate(zip(predictions, references))
             for j, r in enumerate(refs) if clean(p) and clean(r)}  # empty text scores 0
    best = [0.0] * len(predictions)
    if not pairs:
        return best
    meteor = None
    try:
        meteor = Meteor()  # spawns `java -jar meteor-1.5.jar`; loading it takes a few seconds
        _, scores = meteor.compute_score({k: [r] for k, (_, r) in pairs.items()},
                                         {k: [p] for k, (p, _) in pairs.items()})
    except (OSError, ValueError) as e:  # java died: its empty reply fails float()
        return f"METEOR subprocess failed: {e!r}"
    finally:
        if meteor is not None:  # close the JVM now, not whenever the GC runs __del__
            meteor.meteor_p.stdin.close()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
    for key, s in zip(pairs, scores):
        i = int(key.split(":")[0])
        best[i] = max(best[i], float(s))
    return best


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], *,
                   meteor: bool = True) -> dict:
    """ROUGE-L F, BLEU-4 and METEOR, each the max over a sample's references, then averaged.

    BLEU-4 is sentence-level with torchmetrics' add-one smoothing (a single caption rarely
    shares a 4-gram otherwise). ROUGE-L uses the "rougeL" key only: "rougeLsum" needs NLTK
    sentence data that is not available offline. Returns {"rougeL", "bleu4", "meteor", "n",
    "per_sample": {metric: [float]}} and "meteor_unavailable": reason when METEOR is off.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"samples {empty[:5]} have no reference captions")
    per_sample: dict[str, list[float]] = {"rougeL": [], "bleu4": []}
    for pred, refs in zip(predictions, references):
        per_sample["rougeL"].append(max(
            float(rouge_score(pred, r, rouge_keys=("rougeL",))["rougeL_fmeasure"]) for r in refs))
        per_sample["bleu4"].append(max(
            float(bleu_score([pred], [[r]], n_gram=4, smooth=True)) for r in refs))
    out: dict = {}
    if meteor:
        result = _meteor_max(list(predictions), [list(r) for r in references])
        if isinstance(result, str):
            out["meteor_unavailable"] = result
        else:
            per_sample["meteor"] = result
    else:
        out["meteor_unavailable"] = "disabled by the caller"
    n = len(predictions)
    for name, values in per_sample.items():
        out[name] = sum(values) / n if n else 0.0
    return {**out, "n": n, "per_sample": per_sample}


# ------------------------------------------------------------------------------ faithfulness

def faithfulness(texts: Sequence[str], labels: Sequence[Mapping[str, int]], *,
                 matcher: Callable[[str], list[str]] | None = None) -> dict:
    """Do generated descriptions mention the AUs that are actually present?

    Compares the AUs a text mentions (`matcher`, default vocab.phrases.find_aus, which
    skips negated mentions) with the image's positive AUs, over that image's annotated AUs
    only. Precision / recall / F1 are micro-averaged over all (sample, AU) pairs; "exact" is
    the fraction of samples whose mentioned set equals the positive set.
    """
    if matcher is None:
        from expvl.vocab.phrases import find_aus as matcher  # lazy: heavy regex table
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} label dicts")
    tp = fp = fn = exact = 0
    per_sample = []
    for text, lab in zip(texts, labels):
        lab = {au_name(k): int(v) for k, v in lab.items()}
        said = {au_name(a) for a in matcher(text)} & set(lab)
        positive = {a for a, v in lab.items() if v}
        s_tp, s_fp, s_fn = len(said & positive), len(said - positive), len(positive - said)
        tp, fp, fn, exact = tp + s_tp, fp + s_fp, fn + s_fn, exact + (said == positive)
        per_sample.append({"tp": s_tp, "fp": s_fp, "fn": s_fn, "exact": said == positive})
    n = len(texts)
    return {"precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
            "exact": exact / n if n else 0.0, "n": n,
            "tp": tp, "fp": fp, "fn": fn, "per_sample": per_sample}
