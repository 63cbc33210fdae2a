"""Evaluation of a VL-FAU run: its AU head's F1 (over folds, the papers' protocol) and explanations.

`evaluate_vlfau(run)` takes a run opened by the run loader (training/runs.py `open_run`) and reads
`dir`, `recipe`, `part_names`, `tokenizer`, `model(part)`, `test_records(part)`, `data_root(part)` and
`embed(model, records, part)`. Per part it writes `<run>/<part>/metrics.json` (the AU head's F1 on the
part's test records, explanations of a few of them and their agreement with the prediction); then
`<run>/eval/metrics.json` and `report.md`: per-AU F1 (for folds: each AU's F1 averaged over the folds),
explanations of a few test faces.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import torch

from expvl.datamodules.images import resolve_image
from expvl.datamodules.labels import au_targets
from expvl.evaluation.metrics import AUMetrics
from expvl.evaluation.report import write_report
from expvl.models.vlfau import VLFAU, Explanation
from expvl.vocab.facs import sort_aus
from expvl.vocab.records import Record

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_part(model: VLFAU, records: list[Record], embed, tokenizer, *,
                  explain: int, batch_size: int = 64) -> dict:
    """The AU head's F1 on `records` and explanations of the first `explain` of them.

    embed: records -> image_embeds (B, N, Dv) after ln_vision (cached features or the image path).
    """
    metrics = AUMetrics(model.cfg.aus)
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        probs = model.au_logits(model.query_features(embed(chunk))).sigmoid()
        labels = au_targets(chunk, model.cfg.aus)
        metrics.update((probs > model.cfg.threshold).long(), labels["targets"].long(), labels["annotated"])
    explained: list[Explanation] = model.explain(embed(records[:explain]), tokenizer) if explain else []
    n = max(1, len(explained))
    return {"au_classifier": metrics.compute(),
            "explanations": [{"id": r.id, **asdict(e)} for r, e in zip(records, explained)],
            "agreement": sum(e.agreement for e in explained) / n,
            "local_consistency": sum(e.local_consistency for e in explained) / n}


def fold_mean(parts: dict[str, dict]) -> dict:
    """AUMetrics-shaped result over parts: each AU's F1 averaged over the parts that score it."""
    if len(parts) == 1:
        return next(iter(parts.values()))["au_classifier"]
    per_au: dict[str, list[float]] = {}
    for m in parts.values():
        for au, f1 in m["au_classifier"]["f1"].items():
            per_au.setdefault(au, []).append(f1)
    f1 = {au: sum(v) / len(v) for au, v in per_au.items()}
    support = {au: sum(m["au_classifier"]["support"].get(au, 0) for m in parts.values()) for au in f1}
    return {"f1": f1, "macro_f1": sum(f1.values()) / len(f1), "support": support, "skipped": [],
            "folds": {name: m["au_classifier"]["macro_f1"] for name, m in parts.items()}}


def evaluate_vlfau(run) -> dict:
    """Every part's AU head and explanations, the fold mean, the report; returns the written metrics and
    each part's macro-F1 (`parts`)."""
    results, gallery = {}, []
    for name in run.part_names:
        model, test = run.model(name), run.test_records(name)
        results[name] = evaluate_part(model, test, lambda recs, m=model, part=name: run.embed(m, recs, part),
                                      run.tokenizer, explain=run.recipe.explain)
        (run.dir / name / "metrics.json").write_text(json.dumps(results[name], indent=1))
        log.info("VL-FAU %s: AU head macro-F1 %.3f", name, results[name]["au_classifier"]["macro_f1"])
        by_id = {r.id: r for r in test}
        for e in results[name]["explanations"][:6 if not gallery else 0]:
            r = by_id[e["id"]]
            lines = [f"{au}: {text}" for au, text in e["local"].items()] + [e["global_text"]]
            gallery.append({"image": resolve_image(r.image, run.data_root(name)),
                            "title": f"predicted {', '.join(sort_aus(e['predicted'])) or 'none'}; "
                                     f"annotated {', '.join(sort_aus(r.positive_aus)) or 'none'}",
                            "text": "\n".join(lines)})
    head = fold_mean(results)
    metrics = {"au_classifier": head, "headline": {
        "au_macro_f1_classifier": head["macro_f1"],
        "explanation_agreement": sum(m["agreement"] for m in results.values()) / len(results)}}
    write_report(run.dir / "eval", metrics, gallery=gallery)
    return {**metrics, "parts": {name: m["au_classifier"]["macro_f1"] for name, m in results.items()}}
