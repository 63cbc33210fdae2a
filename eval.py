"""Evaluation and inference entry point: turn a trained run into the numbers the papers report.

    python eval.py --run runs/default                   # metrics.json, report.md, plots in runs/default/eval
    python eval.py --run runs/recipe                    # a `train.py mode=stage` run: what its stage trained
    python eval.py --run runs/vlfau_synthfacs           # a VL-FAU run: its AU head and explanations
    python eval.py ask --run runs/default --image face.jpg --question "Are the inner brows raised?"
    python eval.py explain --run runs/vlfau_synthfacs --image face.jpg   # VL-FAU: AUs + their explanation
    python eval.py compare runs/default runs/vlfau_synthfacs   # per-AU F1 of several runs side by side

The run folder is opened by the one run loader (expvl.training.runs `open_run`, any system and
layout) and handed to expvl.evaluation (`evaluate` for BLIP-2 runs, `evaluate_vlfau` for VL-FAU
runs); `ask` and `explain` go through the Python API (`expvl.load`). A mistake the user can fix (a
missing file, a run of the wrong kind, a GPU the machine lacks) ends in one line on stderr and exit
code 2, argparse's own for usage errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import NoReturn

log = logging.getLogger("eval")

DEVICE_HELP = "where the models run: auto (a GPU when torch sees one, else cpu), cpu, cuda, cuda:1, ..."

# The commands besides plain evaluation, with the line `python eval.py --help` lists for each.
COMMANDS = {
    "ask": "answer a question about one face (a BLIP-2 run's stage-3 model)",
    "explain": "a VL-FAU run's AUs for one face, each with its sentence",
    "compare": "per-AU F1 of evaluated runs side by side (a markdown table)",
}


def parsers() -> dict[str, argparse.ArgumentParser]:
    """One parser per command, "" for plain evaluation. Built in one place so that `--help` of each
    can be checked: every option says what it does, and the plain one lists the other commands."""
    listing = "\n".join(f"  {name:<9}{what}" for name, what in COMMANDS.items())
    out = {"": argparse.ArgumentParser(
        prog="python eval.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [--run RUN] [--split SPLIT] [--limit N] [--device DEVICE]\n"
              f"       %(prog)s {{{','.join(COMMANDS)}}} ...",
        description="Evaluate a trained run: <run>/eval/metrics.json, report.md and its plots.",
        epilog=f"commands (python eval.py COMMAND --help for their options):\n{listing}")}
    p = out[""]
    p.add_argument("--run", default="runs/default", help="the run folder to evaluate (default: %(default)s)")
    p.add_argument("--split", default="test",
                   help="the split of the run's data to evaluate (default: %(default)s); a VL-FAU run "
                        "always uses its recipe's test records")
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="evaluate only the split's first N records (default: 0 = all; not for VL-FAU runs)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP + " (BLIP-2-family runs; VL-FAU evaluates on the CPU)")
    for name, what in COMMANDS.items():
        out[name] = argparse.ArgumentParser(prog=f"python eval.py {name}", description=what[0].upper() + what[1:] + ".")
    p = out["ask"]
    p.add_argument("--run", required=True, help="a run folder with a stage-3 model, or a transformers "
                                                "InstructBlip / Blip2 folder")
    p.add_argument("--image", required=True, help="the face: an image file (jpg, png, ...)")
    p.add_argument("--question", required=True, help='the question, e.g. "Are the inner brows raised?"')
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p = out["explain"]
    p.add_argument("--run", required=True, help="a VL-FAU run folder (train.py --config vlfau_*)")
    p.add_argument("--image", required=True, help="the face: an image file (jpg, png, ...)")
    p.add_argument("--part", default="", help="main or fold<k> (default: main, else the first fold)")
    out["compare"].add_argument("runs", nargs="+", help="run folders with eval/metrics.json")
    return out


def _fail(parser: argparse.ArgumentParser, message) -> NoReturn:
    """A usage or input error: one line on stderr, exit code 2 (argparse's own), no traceback."""
    parser.exit(2, f"{parser.prog}: error: {' '.join(str(message).split())}\n")


def _device(parser: argparse.ArgumentParser, name: str) -> str:
    """`name` checked before any model loads: a missing GPU is a usage error, not a crash mid-run."""
    from expvl.training.runs import resolve_device
    try:
        return str(resolve_device(name))
    except (ValueError, RuntimeError) as e:
        _fail(parser, f"--device: {e}")


def _image(parser: argparse.ArgumentParser, path: str) -> str:
    """The face checked before any model loads, so a typo costs no loading time."""
    if not Path(path).is_file():
        _fail(parser, f"--image {path}: no such file")
    return path


def main(argv: list[str] | None = None) -> dict | str:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else ""
    parser = parsers()[command]
    args = parser.parse_args(argv[1:] if command else argv)  # before torch is imported: --help stays quick
    from expvl.models.convert.weights import CheckpointError
    from expvl.vocab.shards import ShardError

    try:
        return RUNNERS[command](parser, args)
    # what a user can cause and fix: a path, a run of the wrong kind, a bad checkpoint or data folder; each
    # message names the file or the key, which a traceback would only bury
    except (ValueError, OSError, CheckpointError, ShardError) as e:
        _fail(parser, e)


def _evaluate(parser: argparse.ArgumentParser, a: argparse.Namespace) -> dict:
    from expvl.evaluation.evaluate import evaluate
    from expvl.evaluation.vlfau import evaluate_vlfau
    from expvl.training.runs import VLFAURun, open_run

    device = _device(parser, a.device)
    run = open_run(a.run, device=device)
    if isinstance(run, VLFAURun):
        if device != "cpu":
            log.warning("--device %s: a VL-FAU run is evaluated on the CPU", device)
        metrics = evaluate_vlfau(run)
    else:
        metrics = evaluate(run, split=a.split, limit=a.limit)
    print(json.dumps(metrics["headline"], indent=1))
    return metrics


def _ask(parser: argparse.ArgumentParser, a: argparse.Namespace) -> str:
    import expvl

    device, image = _device(parser, a.device), _image(parser, a.image)
    model = expvl.load(a.run, device=device)
    if model.vlfau:
        _fail(parser, f"{a.run} is a VL-FAU run, and ask is for BLIP-2 runs; explain its AUs instead: "
                      f"python eval.py explain --run {a.run} --image {a.image}")
    answer = model.ask(image, a.question)
    print(answer)
    return answer


def _explain(parser: argparse.ArgumentParser, a: argparse.Namespace) -> dict:
    import expvl

    image = _image(parser, a.image)
    model = expvl.load(a.run, part=a.part)
    if not model.vlfau:
        _fail(parser, f"{a.run} is a BLIP-2 run, and explain is for VL-FAU runs (train.py --config vlfau_synthfacs); "
                      f"ask this one instead: python eval.py ask --run {a.run} --image {a.image} "
                      '--question "Are the inner brows raised?"')
    out = model.explain(image)
    print(json.dumps(out, indent=1))
    return out


def _compare(parser: argparse.ArgumentParser, a: argparse.Namespace) -> str:
    from expvl.evaluation.compare import compare

    table = compare(a.runs)
    print(table)
    return table


RUNNERS = {"": _evaluate, "ask": _ask, "explain": _explain, "compare": _compare}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
