"""Evaluation and inference entry point: turn a trained run into the numbers the papers report.

    python eval.py --run runs/default                   # metrics.json, report.md, plots in runs/default/eval
    python eval.py --run runs/recipe                    # a `train.py mode=stage` run: what its stage trained
    python eval.py --run runs/vlfau_synthfacs           # a VL-FAU run: its AU head and explanations
    python eval.py ask --run runs/default --image face.jpg --question "Are the inner brows raised?"
    python eval.py explain --run runs/vlfau_synthfacs --image face.jpg   # VL-FAU: AUs + their explanation
    python eval.py compare runs/default runs/vlfau_synthfacs   # per-AU F1 of several runs side by side

The run folder is opened by the one run loader (expvl.training.runs `open_run`, any system and
layout) and handed to expvl.evaluation (`evaluate` for BLIP-2 runs, `evaluate_vlfau` for VL-FAU
runs); `ask` and `explain` go through the Python API (`expvl.load`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger("eval")

DEVICE_HELP = "where the models run: auto (a GPU when torch sees one, else cpu), cpu, cuda, cuda:1, ..."


def _device(parser: argparse.ArgumentParser, name: str) -> str:
    """`name` checked before any model loads: a missing GPU is a usage error, not a crash mid-run."""
    from expvl.training.runs import resolve_device
    try:
        return str(resolve_device(name))
    except (ValueError, RuntimeError) as e:
        parser.error(f"--device: {e}")


def main(argv: list[str] | None = None) -> dict | str:
    import expvl
    from expvl.evaluation.compare import compare
    from expvl.evaluation.evaluate import evaluate
    from expvl.evaluation.vlfau import evaluate_vlfau
    from expvl.training.runs import VLFAURun, open_run

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ask":
        p = argparse.ArgumentParser(prog="python eval.py ask")
        p.add_argument("--run", required=True)
        p.add_argument("--image", required=True)
        p.add_argument("--question", required=True)
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        a = p.parse_args(argv[1:])
        answer = expvl.load(a.run, device=_device(p, a.device)).ask(a.image, a.question)
        print(answer)
        return answer
    if argv and argv[0] == "explain":
        p = argparse.ArgumentParser(prog="python eval.py explain")
        p.add_argument("--run", required=True)
        p.add_argument("--image", required=True)
        p.add_argument("--part", default="", help="main or fold<k> (default: main, else the first fold)")
        a = p.parse_args(argv[1:])
        out = expvl.load(a.run, part=a.part).explain(a.image)
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
    run = open_run(a.run, device=device)
    if isinstance(run, VLFAURun):
        if device != "cpu":
            log.warning("--device %s: a VL-FAU run is evaluated on the CPU", device)
        metrics = evaluate_vlfau(run)
    else:
        metrics = evaluate(run, split=a.split, limit=a.limit)
    print(json.dumps(metrics["headline"], indent=1))
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
