"""Evaluation report: metrics.json, report.md and PNG plots, from one metrics dict.

Tables follow the papers' conventions (Exp-BLIP §4.1): AU F1 per AU x100 with its mean, emotion
top-1 accuracy in %, caption metrics x100; the zero-shot split of Exp-VQA (our reconstruction: the
paper's split is not public) as a seen / zero-shot column. Plots use matplotlib's object API
(`Figure`, rendered by Agg): no pyplot, no display, no global state.
Checked by eye on the images written by tests/evaluation/test_report.py.

The metrics dict (every key optional; numbers are fractions in [0, 1], printed x100):

    {
      "meta":              {str: str | number},        # run name, checkpoint, dataset, n ...
      "au_vqa_scoring":    AUMetrics.compute(),        # Q3 yes/no by answer likelihood
      "au_vqa_generation": AUMetrics.compute(),        # Q3 yes/no parsed from generated text
      "au_classifier":     AUMetrics.compute(),        # VL-FAU multi-label AU head
      "zero_shot_aus":     ["AU9", ...],               # AUs never asked about in Q3 training
      "emotion":           EmotionMetrics.compute(),
      "captions":          caption_scores(...),
      "probes":            {task: {"metric": str, "probe": float, "supervised": float}},
      "faithfulness":      faithfulness(...),
    }

A gallery entry is {"image": PIL.Image | path, "title": str, "text": str}; an attention entry
is {"image": PIL.Image | path, "attention": np.ndarray (h, w) or (Q, h, w), "title": str
(optional)}, e.g. the Q-Former cross-attention of each query over the 14x14 patch grid.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from PIL import Image

from expvl.vocab.facs import sort_aus

# The AU result sections, in table-column order, with their column titles.
AU_SECTIONS: dict[str, str] = {
    "au_vqa_scoring": "Q3 scoring",
    "au_vqa_scoring_calibrated": "Q3 scoring, per-AU val threshold",
    "au_vqa_generation": "Q3 generation",
    "au_classifier": "AU head",
}
SEEN_COLOUR, ZERO_SHOT_COLOUR = "#4C72B0", "#DD8452"
MAX_TEXT_LINES = 12  # a gallery description is cut after this many wrapped lines


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


# ------------------------------------------------------------------------------ metrics.json

def json_safe(obj, where: str = "metrics"):
    """Plain JSON types: tensors / arrays become lists, NaN and inf become None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "tolist"):  # torch.Tensor, np.ndarray, numpy scalars
        return json_safe(obj.tolist(), where)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{where}: {type(obj).__name__} is not JSON-serialisable")


# ------------------------------------------------------------------------------ report.md

def _au_table(metrics: dict) -> list[str]:
    sections = [k for k in AU_SECTIONS if k in metrics]
    zero_shot = set(metrics.get("zero_shot_aus", []))
    aus = sort_aus({au for k in sections for au in metrics[k]["support"]})
    split = (lambda au: "zero-shot" if au in zero_shot else "seen")
    columns = [(AU_SECTIONS[k], metrics[k]["f1"]) for k in sections]  # (title, per-AU F1)
    # chance reference: answer "yes" to every question of the first section's questions
    chance = metrics[sections[0]].get("always_yes_f1") if sections else None
    columns += [("always 'yes'", chance)] if chance else []
    head = ["AU"] + (["split"] if zero_shot else []) + [title for title, _ in columns]
    lines = ["## AU detection (F1 x100)", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for au in aus:
        cells = [au] + ([split(au)] if zero_shot else []) + [_pct(f1.get(au)) for _, f1 in columns]
        lines.append("| " + " | ".join(cells) + " |")

    def mean(values: list) -> str:
        return _pct(sum(values) / len(values)) if values else "–"

    pad = [""] if zero_shot else []
    lines.append("| **macro** | " + " | ".join(pad + [f"**{_pct(metrics[k]['macro_f1'])}**" for k in sections]
                                                + ([mean(list(chance.values()))] if chance else [])) + " |")
    for name in (("seen", "zero-shot") if zero_shot else ()):
        cells = [mean([v for au, v in f1.items() if split(au) == name]) for _, f1 in columns]
        lines.append(f"| macro {name} | | " + " | ".join(cells) + " |")
    for k in sections:
        if metrics[k].get("answers"):
            lines.append(f"\n{AU_SECTIONS[k]}: {metrics[k]['unparsed']} of {metrics[k]['answers']} "
                         "answers were neither yes nor no (counted as no).")
        if metrics[k].get("skipped"):
            lines.append(f"\n{AU_SECTIONS[k]}: no annotated positive, F1 undefined: "
                         f"{', '.join(metrics[k]['skipped'])}.")
    return lines


def _emotion_lines(em: dict) -> list[str]:
    summary = (f"Top-1 accuracy **{_pct(em['accuracy'])}**, mean per-class accuracy "
               f"{_pct(em['macro_accuracy'])} over {em['n']} samples; {em['unparsed']} answers "
               "named no emotion (counted as wrong).")
    lines = ["## Emotion", "", summary, "", "| emotion | accuracy | support |", "|---|---|---|"]
    for lab in em["labels"]:
        lines.append(f"| {lab} | {_pct(em['per_class_accuracy'].get(lab))} | {em['support'][lab]} |")
    return lines


def _caption_lines(cap: dict) -> list[str]:
    lines = ["## Captions (max over references, x100)", "", "| metric | score |", "|---|---|"]
    names = {"meteor": "METEOR", "rougeL": "ROUGE-L", "bleu4": "BLEU-4"}
    lines += [f"| {title} | {_pct(cap[k])} |" for k, title in names.items() if k in cap]
    if "meteor_unavailable" in cap:
        lines.append(f"\nMETEOR not computed: {cap['meteor_unavailable']}.")
    return lines + [f"\nn = {cap.get('n', '?')} samples."]


def _probe_lines(probes: dict) -> list[str]:
    lines = ["## Linear probes", "", "| task | metric | probe | supervised |", "|---|---|---|---|"]
    for task, p in probes.items():
        lines.append(f"| {task} | {p.get('metric', '')} | {_pct(p.get('probe'))} | {_pct(p.get('supervised'))} |")
    return lines


def _faithfulness_lines(f: dict) -> list[str]:
    return ["## Faithfulness of descriptions (AUs mentioned vs annotated)", "",
            "| precision | recall | F1 | exact set |", "|---|---|---|---|",
            f"| {_pct(f['precision'])} | {_pct(f['recall'])} | {_pct(f['f1'])} | {_pct(f['exact'])} |",
            f"\nMicro-averaged over {f['n']} descriptions; negated mentions do not count."]


# ------------------------------------------------------------------------------ plots

def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_au_f1(metrics: dict, path: Path) -> Path:
    """Per-AU F1 bars, one panel per AU section; zero-shot AUs in a second colour."""
    sections = [k for k in AU_SECTIONS if k in metrics]
    zero_shot = set(metrics.get("zero_shot_aus", []))
    n_aus = max(len(metrics[k]["f1"]) for k in sections)
    fig = Figure(figsize=(max(5.0, 0.42 * n_aus + 1.5), 2.8 * len(sections)), layout="constrained")
    for ax, k in zip(fig.subplots(len(sections), 1, squeeze=False)[:, 0], sections):
        aus = sort_aus(metrics[k]["f1"])
        values = [100 * metrics[k]["f1"][au] for au in aus]
        colours = [ZERO_SHOT_COLOUR if au in zero_shot else SEEN_COLOUR for au in aus]
        bars = ax.bar(range(len(aus)), values, color=colours, width=0.7)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)  # a zero bar is otherwise invisible
        ax.axhline(100 * metrics[k]["macro_f1"], color="0.3", ls="--", lw=1)
        ax.set_xticks(range(len(aus)), aus, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 108)
        ax.set_ylabel("F1 x100")
        ax.set_title(f"{AU_SECTIONS[k]}: macro F1 {_pct(metrics[k]['macro_f1'])}", fontsize=10)
        handles = [Patch(color=SEEN_COLOUR, label="seen")]
        handles += [Patch(color=ZERO_SHOT_COLOUR, label="zero-shot")] if zero_shot else []
        handles.append(Line2D([], [], color="0.3", ls="--", lw=1, label="macro"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return _save(fig, path)


def plot_confusion(em: dict, path: Path) -> Path:
    """Row-normalised confusion matrix (rows: true label); unparsed answers as a last column."""
    labels, cm = em["labels"], np.asarray(em["confusion"], dtype=float)
    support = np.array([em["support"][lab] for lab in labels], dtype=float)
    columns = list(labels)
    if em["unparsed"]:
        cm = np.concatenate([cm, (support - cm.sum(1))[:, None]], axis=1)
        columns.append("(unparsed)")
    rates = cm / np.maximum(support, 1)[:, None]
    side = 0.6 * len(columns) + 2
    fig = Figure(figsize=(side, 0.6 * len(labels) + 1.8), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(rates.shape):
        if cm[i, j]:
            ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"emotion, accuracy {_pct(em['accuracy'])} (% of each row)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def _as_array(image) -> np.ndarray:
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)


def plot_gallery(gallery: list[dict], path: Path, *, columns: int = 4, wrap: int = 34) -> Path:
    """Faces in a grid, each with its title and its wrapped generated description below."""
    columns = min(columns, len(gallery))
    rows = math.ceil(len(gallery) / columns)
    texts = []
    for g in gallery:
        lines = textwrap.wrap(g.get("text", ""), wrap) or [""]
        texts.append("\n".join(lines[:MAX_TEXT_LINES - 1] + ["..."] if len(lines) > MAX_TEXT_LINES else lines))
    # Each gallery row is an image row and a text row sized by its longest description.
    text_h = [0.16 * max(texts[i].count("\n") + 1 for i in range(r * columns, min((r + 1) * columns, len(texts))))
              + 0.1 for r in range(rows)]
    fig = Figure(figsize=(2.6 * columns, sum(2.4 + h for h in text_h)))
    grid = fig.add_gridspec(2 * rows, columns, height_ratios=[x for h in text_h for x in (2.4, h)],
                            hspace=0.12, wspace=0.08)
    for i, g in enumerate(gallery):
        r, c = divmod(i, columns)
        ax = fig.add_subplot(grid[2 * r, c])
        ax.imshow(_as_array(g["image"]))
        ax.set_title(g.get("title", ""), fontsize=9)
        ax.axis("off")
        tax = fig.add_subplot(grid[2 * r + 1, c])
        tax.axis("off")
        tax.text(0.0, 1.0, texts[i], va="top", ha="left", fontsize=7.5, transform=tax.transAxes)
    return _save(fig, path)


def plot_attention(entries: list[dict], path: Path, *, n_queries: int = 3) -> Path:
    """Each face, its attention averaged over queries, and the `n_queries` most peaked queries.

    Maps are min-max normalised per panel and stretched over the image (bilinear), so the
    panels show where each query looks, not how strongly compared to other images.
    """
    maps_per_row = []
    for e in entries:
        att = np.asarray(e["attention"], dtype=float)
        if att.ndim not in (2, 3):
            raise ValueError(f"attention must be (h, w) or (Q, h, w), got shape {att.shape}")
        panels = [("mean over queries", att.mean(0) if att.ndim == 3 else att)]
        if att.ndim == 3 and att.shape[0] > 1:
            peaked = np.argsort(-att.reshape(len(att), -1).max(1))[:n_queries]
            panels += [(f"query {q}", att[q]) for q in sorted(peaked)]
        maps_per_row.append(panels)
    columns = 1 + max(len(p) for p in maps_per_row)
    fig = Figure(figsize=(2.2 * columns, 2.4 * len(entries)), layout="constrained")
    axes = fig.subplots(len(entries), columns, squeeze=False)
    for row, (e, panels) in zip(axes, zip(entries, maps_per_row)):
        img = _as_array(e["image"])
        h, w = img.shape[:2]
        row[0].imshow(img)
        row[0].set_title(e.get("title", "image"), fontsize=9)
        for ax, (title, m) in zip(row[1:], panels):
            m = (m - m.min()) / (m.max() - m.min() + 1e-12)
            ax.imshow(img)
            ax.imshow(m, cmap="jet", alpha=0.5, extent=(0, w, h, 0), interpolation="bilinear")
            ax.set_title(title, fontsize=9)
        for ax in row:
            ax.axis("off")
    return _save(fig, path)


# ------------------------------------------------------------------------------ entry point

def write_report(out_dir, metrics: dict, *, gallery: list[dict] | None = None,
                 attention_maps: list[dict] | None = None) -> dict[str, Path]:
    """Write metrics.json, report.md and the plots that the available sections allow.

    Args:
        out_dir: folder to write into (created if missing).
        metrics: the dict laid out in this module's docstring; every section optional.
        gallery: faces with their generated descriptions, drawn as a grid.
        attention_maps: faces with Q-Former query-to-image attention, drawn as overlays.
    Returns: {"metrics", "report", "au_f1", "emotion_confusion", "gallery", "attention"} ->
        path, for the files actually written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics": out / "metrics.json"}
    files["metrics"].write_text(json.dumps(json_safe(metrics), indent=2) + "\n")

    md = ["# Evaluation report", ""]
    if metrics.get("meta"):
        md += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in metrics["meta"].items()] + [""]
    if any(k in metrics for k in AU_SECTIONS):
        md += _au_table(metrics)
        if any(metrics[k]["f1"] for k in AU_SECTIONS if k in metrics):
            files["au_f1"] = plot_au_f1(metrics, out / "au_f1.png")
            md += ["", "![per-AU F1](au_f1.png)"]
        md.append("")
    if "emotion" in metrics:
        md += _emotion_lines(metrics["emotion"])
        if metrics["emotion"]["n"]:
            files["emotion_confusion"] = plot_confusion(metrics["emotion"], out / "emotion_confusion.png")
            md += ["", "![emotion confusion matrix](emotion_confusion.png)"]
        md.append("")
    if "captions" in metrics:
        md += _caption_lines(metrics["captions"]) + [""]
    if metrics.get("probes"):
        md += _probe_lines(metrics["probes"]) + [""]
    if metrics.get("faithfulness"):  # empty when the data had no Q1 descriptions to score
        md += _faithfulness_lines(metrics["faithfulness"]) + [""]
    if gallery:
        files["gallery"] = plot_gallery(gallery, out / "gallery.png")
        md += ["## Generated descriptions", "", "![gallery](gallery.png)", ""]
    if attention_maps:
        files["attention"] = plot_attention(attention_maps, out / "attention.png")
        md += ["## Q-Former query-to-image attention", "", "![attention](attention.png)", ""]
    files["report"] = out / "report.md"
    files["report"].write_text("\n".join(md))
    return files
