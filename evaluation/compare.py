"""`python eval.py compare RUN RUN ...`: per-AU F1 of evaluated runs side by side (any system)."""

from __future__ import annotations

import json
from pathlib import Path

from expvl.evaluation.report import AU_SECTIONS
from expvl.vocab.facs import sort_aus


def compare(run_dirs: list[str | Path]) -> str:
    """A markdown table of per-AU F1 (x100): one column per AU result of each run's eval/metrics.json."""
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
