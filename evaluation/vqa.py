"""Exp-VQA's question-answer evaluation of a stage-3 model (evaluate.py `evaluate` calls `vqa_metrics`).

- AU detection from Q3 yes/no questions over the AUs the records annotate (`data_aus`): decided by
  log p("yes") - log p("no") in one scoring pass, plainly (margin > 0) and with a threshold per seen
  AU fitted on the val split; the same questions by greedy generation parsed for yes/no beside them.
  Zero-shot AUs (held out of Q3 training) keep margin > 0 and are listed apart.
- Emotion: the emotion question answered by generation, parsed to the label set.
- Q1 descriptions: caption metrics against the reference answer and AU faithfulness.
The questions reach the model through answerer.py as in training; results are torchmetrics-backed
(metrics.py).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from expvl.evaluation.answerer import Answerer
from expvl.evaluation.metrics import AUMetrics, EmotionMetrics, caption_scores, faithfulness, parse_yes_no
from expvl.vocab.facs import AUS, EMOTIONS, sort_aus


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def data_aus(records: list) -> list[str]:
    """The AUs the records annotate, in FACS order: each dataset's own set (SynthFACS 19, BP4D 12, ...)."""
    found = set()
    for r in records:
        unknown = [au for au in r.aus if au not in AUS]
        if unknown:
            raise ValueError(f"record {r.id}: unknown action unit(s) {unknown} (vocab/facs.py)")
        found.update(r.aus)
    return sort_aus(found)


def vqa_metrics(run, records: list, splits: dict, *, batch_size: int, generation_limit: int,
                notes: list) -> tuple[dict, list]:
    """The stage-3 model's answers: AU detection (Q3), emotion, Q1 descriptions; a section the data
    cannot give is skipped and noted. Returns the metrics and the (record, Q1 answer) pairs."""
    ans = Answerer(run.stage_model("instruct"), run.tokenizers, run.cfg.text, run.device)
    aus = data_aus(records)
    heldout = set(run.heldout_aus) & set(aus)  # zero-shot AUs this data annotates
    out = {}

    # ---- AU detection from Q3 yes/no, by scoring and by generation
    q3 = [(r, p) for r in records for p in r.vqa if p.type == "q3"]
    if q3:
        out = au_metrics(run, ans, q3, splits, aus, heldout, batch_size, generation_limit)
    else:
        notes.append("AU detection: the records have no Q3 (AU yes/no) questions")

    # ---- emotion from the emotion question (generation, parsed)
    em_pairs = [(r, p) for r in records for p in r.vqa if p.type == "emotion" and r.emotion]
    if em_pairs:
        emo = EmotionMetrics(list(EMOTIONS))
        for chunk in batches(em_pairs, batch_size):
            embeds = run.image_embeds(ans.model, [r for r, _ in chunk])
            texts = ans.generate(embeds, [p.question for _, p in chunk], max_new_tokens=6)
            emo.update_answers(texts, [r.emotion for r, _ in chunk])
        out["emotion"] = emo.compute()
    else:
        notes.append("emotion: no emotion question about a record with an emotion label")

    # ---- descriptions: Q1 answers (Exp-VQA) for a gallery and caption metrics
    q1 = [(r, p) for r in records for p in r.vqa if p.type == "q1"][:generation_limit]
    q1_texts = []
    for chunk in batches(q1, batch_size):
        embeds = run.image_embeds(ans.model, [r for r, _ in chunk])
        q1_texts += ans.generate(embeds, [p.question for _, p in chunk], max_new_tokens=80)
    captions = caption_scores(q1_texts, [[p.answer] for _, p in q1]) if q1 else {}
    out["captions"], out["faithfulness"] = captions, faithfulness(q1_texts, [r.aus for r, _ in q1]) if q1 else {}
    return out, [(r, t) for (r, _), t in zip(q1, q1_texts)]


def au_metrics(run, ans: Answerer, q3: list, splits: dict, aus: list[str], heldout: set, batch_size: int,
               generation_limit: int) -> dict:
    """Q3 yes/no over the data's AUs: by scoring (plain and val-calibrated) and by generation."""
    margins = yes_no_margins(run, ans, q3, batch_size)
    # Q3 training pairs are near-balanced yes/no per image, so the model's "yes" prior is far above how
    # often an AU is present: besides the plain decision (margin > 0) we report a threshold on the
    # margin per seen AU, fitted on the val split (one global threshold does worse than the plain
    # decision: the AUs' priors differ). Zero-shot AUs keep margin > 0: their labels stay unseen.
    val_q3 = [(r, p) for r in splits.get("val", []) for p in r.vqa
              if p.type == "q3" and p.au not in heldout]
    val_margins = yes_no_margins(run, ans, val_q3, batch_size)
    thresholds = {}
    for au in sorted({p.au for _, p in val_q3}):
        rows = [i for i, (_, p) in enumerate(val_q3) if p.au == au]
        thresholds[au] = best_threshold(val_margins[rows], [val_q3[i][1].answer == "yes" for i in rows])
    scoring, calibrated, gen = AUMetrics(aus), AUMetrics(aus), AUMetrics(aus)
    for chunk, m in zip(batches(q3, batch_size), batches(margins, batch_size)):
        scoring.update(*_au_rows(chunk, aus, m > 0))
        cut = torch.tensor([thresholds.get(p.au, 0.0) for _, p in chunk])
        calibrated.update(*_au_rows(chunk, aus, m > cut))
    unparsed = 0
    for chunk in batches(q3[:generation_limit * len(aus)], batch_size):
        embeds = run.image_embeds(ans.model, [r for r, _ in chunk])
        texts = ans.generate(embeds, [p.question for _, p in chunk], max_new_tokens=4)
        parsed = [parse_yes_no(t) for t in texts]
        unparsed += sum(v is None for v in parsed)
        preds, targets, annotated = _au_rows(chunk, aus, torch.tensor([v == 1 for v in parsed]))
        gen.update(preds, targets, annotated)
    au_scoring, au_calibrated, au_gen = scoring.compute(), calibrated.compute(), gen.compute()
    return {"q3_questions": len(q3),
            "au_vqa_scoring": au_scoring, "au_vqa_scoring_calibrated": {**au_calibrated, "thresholds": thresholds},
            "au_vqa_generation": {**au_gen, "unparsed": unparsed},
            "zero_shot_aus": sorted(heldout), "seen_aus": [a for a in aus if a not in heldout]}


def yes_no_margins(run, ans: Answerer, pairs: list, batch_size: int) -> torch.Tensor:
    """log p(yes) - log p(no) for every (record, Q3 pair), in order."""
    out = []
    for chunk in tqdm(list(batches(pairs, batch_size)), desc="yes/no scoring", leave=False):
        out.append(ans.score_yes_no(run.image_embeds(ans.model, [r for r, _ in chunk]), [p.question for _, p in chunk]))
    return torch.cat(out) if out else torch.zeros(0)


def best_threshold(margins: torch.Tensor, positive: list[bool]) -> float:
    """The margin threshold that maximises micro F1 of "yes" on (validation) questions; 0 without positives."""
    y = torch.tensor(positive, dtype=torch.bool)
    if not y.any():
        return 0.0
    best, best_f1 = 0.0, -1.0
    for t in torch.quantile(margins, torch.linspace(0.01, 0.99, 99)).tolist():
        pred = margins > t
        tp = (pred & y).sum().item()
        f1 = 2 * tp / max(1, pred.sum().item() + y.sum().item())
        if f1 > best_f1:
            best, best_f1 = t, f1
    return float(best)


def _au_rows(chunk, aus, decisions: torch.Tensor):
    """One row per question: a prediction only in that AU's column (annotated mask selects it)."""
    n, A = len(chunk), len(aus)
    preds = torch.zeros(n, A, dtype=torch.long)
    targets = torch.zeros(n, A, dtype=torch.long)
    annotated = torch.zeros(n, A, dtype=torch.bool)
    for i, ((r, p), d) in enumerate(zip(chunk, decisions.tolist())):
        if p.au not in aus:
            raise ValueError(f"record {r.id}: its Q3 question asks about {p.au}, which no evaluated record "
                             f"annotates (the AUs of this data: {aus})")
        j = aus.index(p.au)
        preds[i, j], targets[i, j], annotated[i, j] = int(d), 1 if p.answer == "yes" else 0, True
    return preds, targets, annotated
