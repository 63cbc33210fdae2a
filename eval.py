"""Evaluation and inference: turn a trained run into the numbers the papers report.

    python eval.py --run runs/default                   # metrics.json, report.md, plots
    python eval.py --run runs/recipe                    # a `train.py mode=stage` run: what its stage trained
    python eval.py ask --run runs/default --image face.jpg --question "Is the inner brow raised?"
    python eval.py --run runs/vlfau_synthfacs           # a VL-FAU run: its AU head (vlfau_pipeline.py)
    python eval.py compare runs/default runs/vlfau_synthfacs   # per-AU F1 of several runs side by side
    python eval.py explain --run runs/vlfau_synthfacs --image face.jpg   # VL-FAU: AUs + their explanation

- Run folders of both layouts load through trained_run.py `open_run` (the embedded default's
  `TrainedRun`, a stage run's stage_run.py `StageRun`); sections that need a stage the run never
  trained (a stage-3 run has no stage-2 model for the probes) or labels the data lacks (emotion)
  are skipped and named under the report's "not evaluated".
- AU detection through VQA (Exp-VQA Q3; vqa_eval.py): over the AUs the evaluated records annotate
  (SynthFACS 19, BP4D 12, DISFA 8 or 12), each test image is asked one yes/no question per
  annotated AU; the answer is decided by comparing log p("yes") and log p("no") in one scoring
  pass; the same questions answered by free (greedy) generation and parsed for yes/no are reported
  beside it.
  AUs held out of Q3 training (zero-shot) are reported separately.
- Emotion: the emotion question answered by generation, parsed to the label set (when the records
  have emotion labels).
- Captions: stage-2 (Exp-BLIP) descriptions vs the references, max over references.
- VL-FAU runs (config `system: vlfau`): the multi-label AU head's F1 and explanation agreement;
  `compare` puts its column next to the Q3-based columns of BLIP-2 runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from answerer import Answerer
from synthesis.shards import read_split_records
from vqa_eval import batches, vqa_metrics

log = logging.getLogger("eval")


def evaluate_run(run_dir: str | Path, *, split: str = "test", limit: int = 0, batch_size: int = 64,
                 generation_limit: int = 200, write: bool = True, device: str = "cpu") -> dict:
    """Evaluate a run folder of either layout (trained_run.py `open_run`) with its models on `device`:
    what needs a stage the run never trained is skipped and named under meta["not evaluated"]."""
    from trained_run import open_run

    run = open_run(run_dir, device=device)
    splits = read_split_records(run.data_root)  # read once: test, val (thresholds) and train (probes)
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
        from models.report import write_report
        gallery = [{"image": run.image(r), "title": f"{r.emotion or 'no emotion'}: {', '.join(r.positive_aus)}",
                    "text": t} for r, t in described[:12]]
        write_report(Path(run_dir) / "eval", metrics, gallery=gallery, attention_maps=extra["attention_maps"])
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
    if m.get("captions"):
        out["rougeL"] = m["captions"].get("rougeL")
    return out


def probes_and_attention(run, test_records: list, train_records: list, *, train_limit: int = 4000, n_maps: int = 8,
                         batch_size: int = 256) -> dict:
    """Exp-BLIP linear probes (Q-Former vs frozen encoder) and Q-Former attention maps for the report."""
    from models.attention_maps import query_attention_maps
    from models.probes import pool_queries, pool_tokens, run_probes

    model = run.stage_model("caption")  # Exp-BLIP probes the Q-Former of its captioning model
    train_records = train_records[:train_limit]
    flat = not getattr(run.encoder, "positional", True)  # position lives in the token order (models/probes.py)

    @torch.no_grad()
    def features(records):
        probe, supervised = [], []
        for chunk in batches(records, batch_size):
            raw = run.features.lookup([r.id for r in chunk])  # (B, N, Dv) frozen-encoder tokens, CPU
            supervised.append(pool_tokens(raw, flatten=flat))
            hidden = model.qformer.encode_queries(model.embed_features(raw.to(run.device)))["hidden"]
            probe.append(pool_queries(hidden, flatten=flat).cpu())
        return {"probe": torch.cat(probe), "supervised": torch.cat(supervised)}

    probes = run_probes(features(train_records), features(test_records),
                        train_records=train_records, test_records=test_records)
    for task in probes.values():
        task.pop("details", None)
    shown = test_records[:n_maps]
    maps = query_attention_maps(model, run.image_embeds(model, shown)) if shown else []
    attention = [{"image": run.image(r), "attention": m,
                  "title": f"{r.emotion or 'no emotion'}: {', '.join(r.positive_aus)}"} for r, m in zip(shown, maps)]
    return {"probes": probes, "attention_maps": attention}


def _macro(au_metrics: dict, subset, key: str = "f1") -> float:
    vals = [au_metrics[key][a] for a in subset if a in au_metrics[key]]
    return sum(vals) / len(vals) if vals else float("nan")


def compare(run_dirs: list[str | Path]) -> str:
    """A markdown table of per-AU F1 (x100): one column per AU result of each run's eval/metrics.json."""
    from models.report import AU_SECTIONS
    from synthesis.facs import sort_aus

    columns = []  # (title, AUMetrics dict)
    for d in run_dirs:
        path = Path(d) / "eval" / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: evaluate {d} first (python eval.py --run {d})")
        m = json.loads(path.read_text())
        columns += [(f"{Path(d).name}: {title}", m[k]) for k, title in AU_SECTIONS.items() if k in m]
    if not columns:
        raise ValueError(f"no AU results in {[str(d) for d in run_dirs]}")
    aus = sort_aus({au for _, m in columns for au in m["f1"]})
    cell = (lambda m, au: "–" if m["f1"].get(au) is None else f"{100 * m['f1'][au]:.1f}")
    lines = ["| AU | " + " | ".join(t for t, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    lines += ["| " + " | ".join([au] + [cell(m, au) for _, m in columns]) + " |" for au in aus]
    lines.append("| **macro** | " + " | ".join(f"**{100 * m['macro_f1']:.1f}**" for _, m in columns) + " |")
    return "\n".join(lines)


def evaluate_vlfau_run(run_dir: str | Path) -> dict:
    """Re-evaluate a VL-FAU run folder (finished parts are loaded, not retrained)."""
    from configs import load_config
    from configs.schema import VLFAURecipe
    from vlfau_pipeline import run_vlfau

    recipe = load_config(VLFAURecipe, [Path(run_dir) / "config.yaml"], [f"run_dir={run_dir}"])
    return run_vlfau(recipe)


def _system(run_dir: str | Path) -> str:
    from configs import config_system
    cfg = Path(run_dir) / "config.yaml"
    return config_system([cfg]) if cfg.exists() else "blip2"


def explain(run_dir: str | Path, image: str | Path, *, part: str = "") -> dict:
    """A VL-FAU run on one image file: AU probabilities, predicted AUs, their sentences, a global
    description and the agreement between predicted and mentioned AUs (models/vlfau.py Explanation)."""
    from dataclasses import asdict

    from datamodules.images import load_image
    from vlfau_pipeline import load_trained

    model, parts, encoder = load_trained(run_dir, part)
    with torch.no_grad():
        embeds = model.encode_image(encoder.eval_transform(load_image(image))[None])
    return asdict(model.explain(embeds, parts.tokenizer)[0])


def ask(run_dir: str | Path, image: str | Path, question: str, *, max_new_tokens: int = 60,
        device: str = "cpu") -> str:
    """Answer one question about one image file with a trained run (stage-3 model) on `device`."""
    from trained_run import open_run

    run = open_run(run_dir, device=device)
    ans = Answerer(run)
    embeds = run.image_embeds_from_file(ans.model, image)
    return ans.generate(embeds, [question], max_new_tokens=max_new_tokens)[0]


DEVICE_HELP = "where the models run: auto (a GPU when torch sees one, else cpu), cpu, cuda, cuda:1, ..."


def _device(parser: argparse.ArgumentParser, name: str) -> str:
    """`name` checked before any model loads: a missing GPU is a usage error, not a crash mid-run."""
    from trained_run import resolve_device
    try:
        return str(resolve_device(name))
    except (ValueError, RuntimeError) as e:
        parser.error(f"--device: {e}")


def main(argv: list[str] | None = None) -> dict | str:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ask":
        p = argparse.ArgumentParser(prog="python eval.py ask")
        p.add_argument("--run", required=True)
        p.add_argument("--image", required=True)
        p.add_argument("--question", required=True)
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        a = p.parse_args(argv[1:])
        answer = ask(a.run, a.image, a.question, device=_device(p, a.device))
        print(answer)
        return answer
    if argv and argv[0] == "explain":
        p = argparse.ArgumentParser(prog="python eval.py explain")
        p.add_argument("--run", required=True)
        p.add_argument("--image", required=True)
        p.add_argument("--part", default="", help="main or fold<k> (default: main, else the first fold)")
        a = p.parse_args(argv[1:])
        out = explain(a.run, a.image, part=a.part)
        print(json.dumps(out, indent=1))
        return out
    if argv and argv[0] == "compare":
        p = argparse.ArgumentParser(prog="python eval.py compare")
        p.add_argument("runs", nargs="+", help="run folders with eval/metrics.json")
        table = compare(p.parse_args(argv[1:]).runs)
        print(table)
        return table
    p = argparse.ArgumentParser(prog="python eval.py")
    p.add_argument("--run", default="runs/default")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--device", default="auto",
                   help=DEVICE_HELP + " (BLIP-2-family runs; VL-FAU evaluates on the CPU)")
    a = p.parse_args(argv)
    device = _device(p, a.device)
    if _system(a.run) == "vlfau":
        if device != "cpu":
            log.warning("--device %s: a VL-FAU run is re-evaluated on the CPU", device)
        summary = evaluate_vlfau_run(a.run)
        print(json.dumps(summary["metrics"], indent=1))
        return summary
    metrics = evaluate_run(a.run, split=a.split, limit=a.limit, device=device)
    print(json.dumps(metrics["headline"], indent=1))
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
