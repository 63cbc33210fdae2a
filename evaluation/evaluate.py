"""Evaluation of a BLIP-2 run: the numbers the papers report, a report and its plots.

`evaluate(run)` takes a run opened by the run loader (training/runs.py `open_run`; evaluation never
opens one itself) and reads from it: `cfg`, `dir`, `data_root`, `heldout_aus`, `meta`, `device`,
`tokenizers`, `encoder`, `features`, `trains(stage)`, `stage_model(stage)`, `image(record)` and
`image_embeds(model, records)`.

- AU detection through VQA (Exp-VQA Q3; vqa.py): over the AUs the evaluated records annotate
  (SynthFACS 19, BP4D 12, DISFA 8 or 12), each test image is asked one yes/no question per
  annotated AU; the answer is decided by comparing log p("yes") and log p("no") in one scoring
  pass; the same questions answered by free (greedy) generation and parsed for yes/no are reported
  beside it. AUs held out of Q3 training (zero-shot) are reported separately, beside the chance
  level of answering "yes" to everything.
- Emotion: the emotion question answered by generation, parsed to the label set (when the records
  have emotion labels).
- Descriptions: Q1 answers against the references (ROUGE-L, BLEU-4, METEOR), and their faithfulness.
- Exp-BLIP linear probes of the stage-2 Q-Former's queries against the frozen encoder's tokens, and
  the Q-Former's attention maps.
Sections that need a stage the run never trained (a stage-3 run has no stage-2 model for the probes)
or labels the data lacks (emotion) are skipped and named under the report's "not evaluated".
"""

from __future__ import annotations

import torch

from expvl.evaluation.attention_maps import query_attention_maps
from expvl.evaluation.probes import pool_queries, pool_tokens, run_probes
from expvl.evaluation.report import face_title, write_report
from expvl.evaluation.vqa import batches, vqa_metrics
from expvl.vocab.shards import read_split_records


def evaluate(run, *, split: str = "test", limit: int = 0, batch_size: int = 64, generation_limit: int = 200,
             write: bool = True) -> dict:
    """Evaluate an opened BLIP-2 run (see the module docstring for what it reads) on its `split`: what needs
    a stage the run never trained is skipped and named under meta["not evaluated"]. With `write`, the
    metrics, report and plots go to `<run>/eval/`."""
    if limit < 0:  # records[:-1] would quietly leave out the last record
        raise ValueError(f"limit must be >= 0 (0 = all records), got {limit}")
    splits = read_split_records(run.data_root)  # read once: test, val (thresholds) and train (probes)
    if split not in splits:
        raise ValueError(f"no split {split!r} in {run.data_root}: its splits are {sorted(splits)}")
    records = splits[split]
    if limit:
        records = records[:limit]
    notes, vqa, described = [], {}, []  # notes: what this run or its data cannot be evaluated on
    if run.trains("instruct"):
        vqa, described = vqa_metrics(run, records, splits, batch_size=batch_size,
                                     generation_limit=generation_limit, notes=notes)
    else:
        notes.append("AU, emotion and description questions: this run has no stage-3 (instruct) model")
    if run.trains("caption"):
        extra = probes_and_attention(run, records, splits.get("train", []))
    else:
        extra = {"probes": {}, "attention_maps": []}
        notes.append("linear probes and attention maps: this run has no stage-2 (caption) model")
    meta = {**run.meta, **({"not evaluated": "; ".join(notes)} if notes else {})}
    metrics = {**({"meta": meta} if meta else {}), "probes": extra["probes"],
               "split": split, "records": len(records), **vqa}
    metrics["headline"] = headline(metrics)
    if write:
        gallery = [{"image": run.image(r), "title": face_title(r.emotion, r.positive_aus), "text": t,
                    "reference": reference} for r, reference, t in described[:12]]
        write_report(run.dir / "eval", metrics, gallery=gallery, attention_maps=extra["attention_maps"])
    return metrics


def headline(m: dict) -> dict:
    """The few numbers printed by `python eval.py` and kept in a pipeline run's summary.json."""
    out = {}
    if "au_vqa_scoring" in m:
        out.update(au_macro_f1_scoring=m["au_vqa_scoring"]["macro_f1"],
                   au_macro_f1_calibrated=m["au_vqa_scoring_calibrated"]["macro_f1"],
                   au_macro_f1_generation=m["au_vqa_generation"]["macro_f1"])
    if "emotion" in m:
        out["emotion_accuracy"] = m["emotion"]["accuracy"]
    if m.get("zero_shot_aus"):  # and its chance level: always "yes"
        out["au_macro_f1_zero_shot"] = _macro(m["au_vqa_scoring"], m["zero_shot_aus"])
        out["au_macro_f1_zero_shot_always_yes"] = _macro(m["au_vqa_scoring"], m["zero_shot_aus"], key="always_yes_f1")
        # the same answers with the label-free threshold (evaluation/vqa.py prior_threshold)
        out["au_macro_f1_zero_shot_calibrated"] = _macro(m["au_vqa_scoring_calibrated"], m["zero_shot_aus"])
        out["au_margin_auc_zero_shot"] = _macro(m["au_vqa_scoring"], m["zero_shot_aus"], key="margin_auc")
    if m.get("au_vqa_wordings", {}).get("macro_f1", {}).get("mean held-out wording") is not None:
        out["au_macro_f1_heldout_wording"] = m["au_vqa_wordings"]["macro_f1"]["mean held-out wording"]
    if m.get("captions"):
        out["rougeL"] = m["captions"].get("rougeL")
    return out


def probes_and_attention(run, test_records: list, train_records: list, *, train_limit: int = 4000, n_maps: int = 8,
                         batch_size: int = 256) -> dict:
    """Exp-BLIP linear probes (Q-Former vs frozen encoder) and Q-Former attention maps for the report."""
    model = run.stage_model("caption")  # Exp-BLIP probes the Q-Former of its captioning model
    instruct = run.stage_model("instruct") if run.trains("instruct") else None  # and stage 3's, same protocol
    train_records = train_records[:train_limit]
    flat = not getattr(run.encoder, "positional", True)  # position lives in the token order (probes.py)

    @torch.no_grad()
    def features(records):
        cols = {"probe": [], "supervised": [], **({"instruct": []} if instruct is not None else {})}
        for chunk in batches(records, batch_size):
            raw = run.features.lookup([r.id for r in chunk])  # (B, N, Dv) frozen-encoder tokens, CPU
            cols["supervised"].append(pool_tokens(raw, flatten=flat))
            for name, m in (("probe", model), ("instruct", instruct)):
                if m is not None:  # the queries without an instruction: what the Q-Former itself keeps
                    hidden = m.qformer.encode_queries(m.embed_features(raw.to(run.device)))["hidden"]
                    cols[name].append(pool_queries(hidden, flatten=flat).cpu())
        return {name: torch.cat(parts) for name, parts in cols.items()}

    probes = run_probes(features(train_records), features(test_records),
                        train_records=train_records, test_records=test_records)
    for task in probes.values():
        task.pop("details", None)
    shown = test_records[:n_maps]
    maps = query_attention_maps(model, run.image_embeds(model, shown)) if shown else []
    attention = [{"image": run.image(r), "attention": m, "title": face_title(r.emotion, r.positive_aus)}
                 for r, m in zip(shown, maps)]
    return {"probes": probes, "attention_maps": attention}


def _macro(au_metrics: dict, subset, key: str = "f1") -> float:
    vals = [au_metrics[key][a] for a in subset if a in au_metrics[key]]
    return sum(vals) / len(vals) if vals else float("nan")
