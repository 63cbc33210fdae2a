"""Results over seeds: one config trained under several seeds, and a table of every headline number.

    python -m expvl.training.seeds --seeds 0 1 2                         # the embedded default
    python -m expvl.training.seeds --config tiny --seeds 0 1 2 --out runs/seeds_tiny
    python -m expvl.training.seeds --seeds 0 1 2 --data-seed stage3.max_steps=800   # overrides go on

Each seed is an ordinary `python train.py` run in `<out>/seed<N>` (so a rerun resumes: finished seeds
and finished steps are skipped) with `seed=N`; with `--data-seed` the synthesized data is drawn with
`synthesis.seed=N` too (the spread then includes the data), else every seed trains on the same
faces. The table (`<out>/seeds.md`, and `<out>/seeds.json` with every run's values) gives, for each
number in a run's `summary.json` headline plus the claims of the papers (`claims` below), the mean,
the sample standard deviation, the minimum and the maximum over the seeds.

A comparison of two configurations is two such tables: a difference smaller than the spread beside it
decides nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def claims(metrics: dict) -> dict[str, float]:
    """The papers' claims at toy scale, as numbers of one run's eval/metrics.json:

    - zero-shot (Exp-VQA): AU F1 on the AUs never asked in Q3 training, beside answering "yes" to all;
    - "language training improves the intermediate features" (Exp-BLIP, Exp-VQA): linear-probe AU F1
      and emotion accuracy on the Q-Former's queries (column "probe": stage 2's; "instruct": stage 3's)
      against the frozen encoder's own tokens ("supervised"), same protocol (evaluation/probes.py), and
      the gain of stage 2 over the encoder;
    - emotion from described actions (Exp-BLIP): emotion accuracy of the stage-3 answers.
    """
    out: dict[str, float] = {}
    head = metrics.get("headline", {})
    if "au_macro_f1_zero_shot" in head:
        out["zero_shot_f1_minus_always_yes"] = head["au_macro_f1_zero_shot"] - head["au_macro_f1_zero_shot_always_yes"]
    for task, probe in metrics.get("probes", {}).items():  # {"metric": ..., "probe": F1 or accuracy, ...}
        for column, value in probe.items():
            if column != "metric" and isinstance(value, (int, float)):
                out[f"probe_{task}_{column}"] = value
        if isinstance(probe.get("probe"), (int, float)) and isinstance(probe.get("supervised"), (int, float)):
            out[f"probe_{task}_gain"] = probe["probe"] - probe["supervised"]
    return out


def run_numbers(run_dir: Path) -> dict[str, float]:
    """A finished run's headline numbers, its claim rows and its wall time (seconds)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics_file = run_dir / "eval" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    numbers = {k: v for k, v in summary.get("metrics", {}).items() if isinstance(v, (int, float))}
    numbers.update(claims(metrics))
    numbers["seconds"] = summary.get("seconds", float("nan"))
    return numbers


def table(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """name -> {mean, std, min, max, n} over the seeds that have it (std: sample, n - 1; 0 for one seed)."""
    names = sorted({k for numbers in per_seed.values() for k in numbers})
    out = {}
    for name in names:
        vals = [numbers[name] for numbers in per_seed.values()
                if name in numbers and not math.isnan(numbers[name])]
        if not vals:
            continue
        out[name] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                     "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


def markdown(rows: dict[str, dict[str, float]], seeds: list[int], title: str) -> str:
    lines = [f"{title}: seeds {', '.join(map(str, seeds))}", "",
             "| metric | mean | std | min | max | n |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        fmt = "{:.1f}" if name == "seconds" else "{:.3f}"
        lines.append(f"| {name} | " + " | ".join(fmt.format(r[k]) for k in ("mean", "std", "min", "max"))
                     + f" | {r['n']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m expvl.training.seeds", description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=[], help="as train.py's --config (default: default)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the seeds to run (default: 0 1 2)")
    p.add_argument("--out", default="", help="folder of the seed runs (default: runs/seeds_<config>)")
    p.add_argument("--data-seed", action="store_true", help="draw the synthesized data with each seed too")
    p.add_argument("--table-only", action="store_true", help="train nothing: tabulate the seeds already run")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed to every run")
    args = p.parse_args(argv)
    configs = args.config or ["default"]
    out = Path(args.out or f"runs/seeds_{Path(configs[-1]).stem}")
    out.mkdir(parents=True, exist_ok=True)
    per_seed = {}
    for seed in args.seeds:
        run_dir = out / f"seed{seed}"
        if not args.table_only:
            cmd = [sys.executable, str(ROOT / "train.py"), *[a for c in configs for a in ("--config", c)],
                   *args.overrides, f"seed={seed}", f"run_dir={run_dir}"]
            if args.data_seed:
                cmd.append(f"synthesis.seed={seed}")
            print(f"seed {seed}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
        if not (run_dir / "summary.json").exists():
            raise SystemExit(f"{run_dir}/summary.json: seed {seed} has not finished (run without --table-only)")
        per_seed[seed] = run_numbers(run_dir)
    rows = table(per_seed)
    title = f"`{' '.join('--config ' + c for c in configs)}{' ' + ' '.join(args.overrides) if args.overrides else ''}`"
    (out / "seeds.json").write_text(json.dumps({"configs": configs, "overrides": args.overrides,
                                                "data_seed": args.data_seed, "runs": per_seed, "table": rows},
                                               indent=1))
    text = markdown(rows, list(per_seed), title)
    (out / "seeds.md").write_text(text)
    print(text, end="")
    return rows


if __name__ == "__main__":
    main()
