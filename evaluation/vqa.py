"""Exp-VQA's question-answer evaluation of a stage-3 model (evaluate.py `evaluate` calls `vqa_metrics`).

- AU detection from Q3 yes/no questions over the AUs the records annotate (`data_aus`): decided by
  log p("yes") - log p("no") in one scoring pass, plainly (margin > 0) and with a threshold per seen
  AU fitted on the val split; the same questions by greedy generation parsed for yes/no beside them.
  Zero-shot AUs (held out of Q3 training) are listed apart; their calibrated threshold uses no label
  of theirs (`prior_threshold`). Per AU, the AUC of the margin says how well the answers rank the
  faces whatever the threshold.
- Wordings: the same yes/no questions asked in words the training never used (`wording_metrics`).
- Emotion: the emotion question answered by generation, parsed to the label set.
- Q1 descriptions: caption metrics against the reference answer and AU faithfulness.
The questions reach the model through answerer.py as in training; results are torchmetrics-backed
(metrics.py).
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import binary_auroc
from tqdm import tqdm

from expvl.evaluation.answerer import Answerer
from expvl.evaluation.metrics import AUMetrics, EmotionMetrics, caption_scores, faithfulness, parse_yes_no
from expvl.synthesis.vqa import Q3_PARAPHRASES, Q3_QUESTIONS, format_q3
from expvl.vocab.facs import AUS, EMOTIONS, sort_aus
from expvl.vocab.records import VQAPair


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
    cannot give is skipped and noted. Returns the metrics and (record, reference, Q1 answer) triples."""
    ans = Answerer(run.stage_model("instruct"), run.tokenizers, run.cfg.text, run.device)
    aus = data_aus(records)
    heldout = set(run.heldout_aus) & set(aus)  # zero-shot AUs this data annotates
    out = {}

    # ---- AU detection from Q3 yes/no, by scoring and by generation
    q3 = [(r, p) for r in records for p in r.vqa if p.type == "q3"]
    if q3:
        out = au_metrics(run, ans, q3, splits, aus, heldout, batch_size, generation_limit)
        trained = trained_wordings(splits.get("train", []))
        out["au_vqa_wordings"] = wording_metrics(run, ans, records, aus, trained, heldout, batch_size)
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
    return out, [(r, p.answer, t) for (r, p), t in zip(q1, q1_texts)]


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
    for au, rows in sorted(rows_by_au(val_q3).items()):
        thresholds[au] = best_threshold(val_margins[rows], [val_q3[i][1].answer == "yes" for i in rows])
    # zero-shot AUs: a threshold from the seen AUs' labels and the unseen AU's own unlabelled val margins
    val_seen = [p.answer == "yes" for _, p in val_q3]
    prior = sum(val_seen) / len(val_seen) if val_seen else 0.0
    val_unseen = [(r, p) for r in splits.get("val", []) for p in r.vqa if p.type == "q3" and p.au in heldout]
    unseen_margins = yes_no_margins(run, ans, val_unseen, batch_size)
    for au, rows in sorted(rows_by_au(val_unseen).items()):
        thresholds[au] = prior_threshold(unseen_margins[rows], prior)
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
    au_scoring["margin_auc"] = margin_auc(q3, margins)
    return {"q3_questions": len(q3), "seen_yes_prior": prior,
            "au_vqa_scoring": au_scoring, "au_vqa_scoring_calibrated": {**au_calibrated, "thresholds": thresholds},
            "au_vqa_generation": {**au_gen, "unparsed": unparsed},
            "zero_shot_aus": sorted(heldout), "seen_aus": [a for a in aus if a not in heldout]}


def yes_no_margins(run, ans: Answerer, pairs: list, batch_size: int) -> torch.Tensor:
    """log p(yes) - log p(no) for every (record, Q3 pair), in order."""
    out = []
    for chunk in tqdm(list(batches(pairs, batch_size)), desc="yes/no scoring", leave=False):
        out.append(ans.score_yes_no(run.image_embeds(ans.model, [r for r, _ in chunk]), [p.question for _, p in chunk]))
    return torch.cat(out) if out else torch.zeros(0)


def rows_by_au(pairs: list) -> dict[str, list[int]]:
    """AU -> the indices of its (record, Q3 pair) entries in `pairs`, AUs in FACS order."""
    rows: dict[str, list[int]] = {}
    for i, (_, p) in enumerate(pairs):
        rows.setdefault(p.au, []).append(i)
    return {au: rows[au] for au in sort_aus(rows)}


def margin_auc(pairs: list, margins: torch.Tensor) -> dict[str, float]:
    """Per AU, the AUC of the yes/no margin over the faces asked about it (0.5: no ranking at all;
    an AU whose faces are all positive or all negative has none)."""
    out = {}
    for au, rows in rows_by_au(pairs).items():
        y = torch.tensor([pairs[i][1].answer == "yes" for i in rows])
        if y.any() and not y.all():
            out[au] = float(binary_auroc(margins[rows], y.long()))
    return out


def prior_threshold(margins: torch.Tensor, prior: float) -> float:
    """The margin above which a `prior` share of these (unlabelled) questions is answered "yes": for an AU
    whose labels stay unseen, the share of "yes" answers of the seen AUs on the same faces. What it
    corrects is the yes/no bias of a question never asked in training; it ranks nothing by itself."""
    if len(margins) == 0 or prior <= 0:
        return 0.0
    return float(torch.quantile(margins.float(), 1.0 - prior))


def trained_wordings(train_records: list) -> list[str]:
    """The Q3 templates (of Q3_QUESTIONS and Q3_PARAPHRASES) whose questions the training split asks."""
    asked = {(p.au, p.question) for r in train_records for p in r.vqa if p.type == "q3"}
    aus = {au for au, _ in asked}
    return [t for t in dict.fromkeys(Q3_QUESTIONS + Q3_PARAPHRASES)
            if any((au, format_q3(t, au)) in asked for au in aus)]


def wording_metrics(run, ans: Answerer, records: list, aus: list[str], trained: list[str], heldout: set,
                    batch_size: int, faces: int = 100) -> dict:
    """Q3 AU macro-F1 (margin > 0) of the first `faces` records, asked in each trained wording and in each
    of `Q3_PARAPHRASES` that training never used; "mean held-out wording" averages the latter. Over the
    trained AUs only (the zero-shot ones are apart already)."""
    seen = [a for a in aus if a not in heldout]
    forms = [(f"trained: {t}", t) for t in trained] + [(t, t) for t in Q3_PARAPHRASES if t not in trained]
    chosen = [r for r in records if any(a in r.aus for a in seen)][:faces]
    out = {}
    for label, template in forms:
        pairs = [(r, VQAPair("q3", format_q3(template, a), "yes" if r.aus[a] else "no", au=a))
                 for r in chosen for a in seen if a in r.aus]
        if not pairs:
            continue
        margins = yes_no_margins(run, ans, pairs, batch_size)
        m = AUMetrics(seen)
        for chunk, part in zip(batches(pairs, batch_size), batches(margins, batch_size)):
            m.update(*_au_rows(chunk, seen, part > 0))
        out[label] = m.compute()["macro_f1"]
    held = [v for k, v in out.items() if not k.startswith("trained: ")]
    if held:
        out["mean held-out wording"] = sum(held) / len(held)
    return {"faces": len(chosen), "macro_f1": out}


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
