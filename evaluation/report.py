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

A gallery entry is {"image": PIL.Image | path, "title": str, "text": str (the generated description),
"reference": str (optional: the description it is scored against)}; an attention entry
is {"image": PIL.Image | path, "attention": np.ndarray (h, w) or (Q, h, w), "title": str
(optional)}, e.g. the Q-Former cross-attention of each query over the 14x14 patch grid.
"""

from __future__ import annotations

import json
import math
import textwrap
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
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
TITLE_PT, TEXT_PT = 8.5, 7.5  # gallery font sizes (points)


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


# What each column of the probe table is (evaluation/probes.py says it at length), printed under it;
# "probe" and "supervised" are always shown, the others where a run has them.
PROBE_COLUMNS = {
    "probe": "a linear classifier trained on the pooled outputs of the stage-2 Q-Former's queries",
    "supervised": "the same classifier on the pooled tokens of the frozen image encoder that the Q-Former "
                  "reads; where that encoder was itself trained on these labels (the embedded default) it is "
                  'the labels-only reference, and "probe" above it means the language stages added something',
    "instruct": "the same classifier on the pooled query outputs of the stage-3 Q-Former, asked no instruction",
}


def _probe_lines(probes: dict) -> list[str]:
    shown = [c for c in PROBE_COLUMNS if c in ("probe", "supervised") or any(c in p for p in probes.values())]
    lines = ["## Linear probes", "", "| task | metric | " + " | ".join(shown) + " |", "|---|---|" + "---|" * len(shown)]
    for task, p in probes.items():
        lines.append(f"| {task} | {p.get('metric', '')} | " + " | ".join(_pct(p.get(c)) for c in shown) + " |")
    return lines + [""] + [f'- "{c}": {PROBE_COLUMNS[c]}.' for c in shown]


def _faithfulness_lines(f: dict) -> list[str]:
    return ["## Faithfulness of descriptions (AUs mentioned vs annotated)", "",
            "| precision | recall | F1 | exact set |", "|---|---|---|---|",
            f"| {_pct(f['precision'])} | {_pct(f['recall'])} | {_pct(f['f1'])} | {_pct(f['exact'])} |",
            f"\nMicro-averaged over {f['n']} descriptions; negated mentions do not count."]


# ------------------------------------------------------------------------------ plots

def face_title(emotion: str | None, aus: Iterable[str]) -> str:
    """A face's label in the gallery and attention plots: its emotion, then its AUs in FACS order.

    Records keep their AUs in the order they were stored in (sorted as text once written to a shard,
    AU1, AU2, AU20, ..., AU4), which reads as noise next to a face.
    """
    return f"{emotion or 'no emotion'}: {', '.join(sort_aus(aus)) or 'no AU'}"


@lru_cache(maxsize=1)
def _font_glyphs() -> frozenset[int]:
    """The code points the default plot font can draw."""
    return frozenset(FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap())


def plot_text(text: str) -> str:
    """`text` as the plot font can draw it: control and format characters become spaces (newlines stay)
    and characters the font lacks become "?", instead of a warning per glyph and an empty box."""
    def drawable(c: str) -> str:
        if c == "\n":
            return c
        if unicodedata.category(c).startswith("C"):  # Cc control, Cf format, Co / Cn unassigned, ...
            return " "
        return c if ord(c) in _font_glyphs() else "?"

    return "".join(map(drawable, text))


def _wrapped(text: str, width: int, max_lines: int) -> list[str]:
    """`text` made drawable and wrapped to `width` characters, keeping its own line breaks; cut after
    `max_lines` lines with a last "..."."""
    lines = [w for para in plot_text(text).split("\n") for w in (textwrap.wrap(para, width) or [""])]
    return lines[:max_lines - 1] + ["..."] if len(lines) > max_lines else lines


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_au_f1(metrics: dict, path: Path) -> Path:
    """Per-AU F1 bars, one panel per AU section; zero-shot AUs in a second colour."""
    return _save(au_f1_figure(metrics), path)


def au_f1_figure(metrics: dict) -> Figure:
    """The figure of `plot_au_f1`. Each bar has its chance reference drawn across it: the F1 of
    answering "yes" to every question about that AU (2p / (1 + p) for a positive rate p), where a
    section has it (`always_yes_f1`); a bar under its mark does worse than saying "yes" every time."""
    sections = [k for k in AU_SECTIONS if k in metrics]
    zero_shot = set(metrics.get("zero_shot_aus", []))
    n_aus = max(len(metrics[k]["f1"]) for k in sections)
    fig = Figure(figsize=(max(5.0, 0.42 * n_aus + 1.5), 2.8 * len(sections)), layout="constrained")
    for ax, k in zip(fig.subplots(len(sections), 1, squeeze=False)[:, 0], sections):
        aus = sort_aus(metrics[k]["f1"])
        values = [100 * metrics[k]["f1"][au] for au in aus]
        colours = [ZERO_SHOT_COLOUR if au in zero_shot else SEEN_COLOUR for au in aus]
        bars = ax.bar(range(len(aus)), values, color=colours, width=0.7)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1,  # a zero bar is otherwise invisible
                     bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.3})  # over the mark
        ax.axhline(100 * metrics[k]["macro_f1"], color="0.3", ls="--", lw=1)
        chance = metrics[k].get("always_yes_f1") or {}
        marked = [i for i, au in enumerate(aus) if au in chance]
        if marked:
            ax.hlines([100 * chance[aus[i]] for i in marked], [i - 0.45 for i in marked], [i + 0.45 for i in marked],
                      colors="black", lw=1.5, gid="always-yes")
        ax.set_xticks(range(len(aus)), aus, rotation=45, ha="right", fontsize=8)
        for label in ax.get_xticklabels():  # a zero-F1 zero-shot bar is invisible: its name keeps the colour
            label.set_color(ZERO_SHOT_COLOUR if label.get_text() in zero_shot else "black")
        ax.set_ylim(0, 108)
        ax.set_ylabel("F1 x100")
        ax.set_title(f"{AU_SECTIONS[k]}: macro F1 {_pct(metrics[k]['macro_f1'])}", fontsize=10)
        handles = [Patch(color=SEEN_COLOUR, label="seen")]
        handles += [Patch(color=ZERO_SHOT_COLOUR, label="zero-shot")] if zero_shot else []
        handles.append(Line2D([], [], color="0.3", ls="--", lw=1, label="macro"))
        handles += [Line2D([], [], color="black", lw=1.5, label="always 'yes'")] if marked else []
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


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
    """Faces in a grid, each with its title, its generated description and, where the entry has one,
    the reference it is scored against, each under a label saying which it is."""
    return _save(gallery_figure(gallery, columns=columns, wrap=wrap), path)


def gallery_figure(gallery: list[dict], *, columns: int = 4, wrap: int = 34) -> Figure:
    """The figure of `plot_gallery`, `wrap` characters to a text line.

    Laid out in inches from the wrapped line counts rather than by a grid of axes: a long title or
    description makes its row taller instead of running into its neighbours.
    """
    columns = min(columns, len(gallery))
    cell_w, side, gap = 2.6, 2.0, 0.08  # inches: a column, the face, the space between blocks
    line = (lambda pt: 1.25 * pt / 72)  # inches per text line at `pt` points
    rows = []  # per gallery row: its cells (entry, title lines, [(label, lines)]), title and text heights
    for first in range(0, len(gallery), columns):
        cells = []
        for g in gallery[first:first + columns]:
            texts = [("generated", g.get("text", ""))] + ([("reference", g["reference"])] if g.get("reference") else [])
            cells.append((g, _wrapped(g.get("title", ""), wrap, 4),
                          [(label, _wrapped(t, wrap, MAX_TEXT_LINES)) for label, t in texts]))
        title_h = max(len(title) for _, title, _ in cells) * line(TITLE_PT)
        text_h = max(sum((1 + len(lines)) * line(TEXT_PT) + gap for _, lines in blocks) for _, _, blocks in cells)
        rows.append((cells, title_h, text_h))
    width = columns * cell_w
    height = sum(title_h + side + text_h + 3 * gap for _, title_h, text_h in rows)
    fig = Figure(figsize=(width, height))

    def put(x: float, y: float, text: str, pt: float, **kw):  # x, y in inches from the top left
        fig.text(x / width, 1 - y / height, text, fontsize=pt, va="top", parse_math=False, **kw)

    top = 0.0
    for cells, title_h, text_h in rows:
        for c, (g, title, blocks) in enumerate(cells):
            left = c * cell_w + (cell_w - side) / 2
            put(left + side / 2, top, "\n".join(title), TITLE_PT, ha="center")
            ax = fig.add_axes((left / width, 1 - (top + title_h + gap + side) / height, side / width, side / height))
            ax.imshow(_as_array(g["image"]))
            ax.axis("off")
            y = top + title_h + side + 2 * gap
            for label, lines in blocks:
                put(left, y, f"{label}:", TEXT_PT, fontweight="bold", color="0.35")
                put(left, y + line(TEXT_PT), "\n".join(lines), TEXT_PT)
                y += (1 + len(lines)) * line(TEXT_PT) + gap
        top += title_h + side + text_h + 3 * gap
    return fig


def plot_attention(entries: list[dict], path: Path, *, n_queries: int = 3) -> Path:
    """Each face, its attention averaged over queries, and the `n_queries` most peaked queries."""
    return _save(attention_figure(entries, n_queries=n_queries), path)


def attention_figure(entries: list[dict], *, n_queries: int = 3) -> Figure:
    """The figure of `plot_attention`; a face's title is wrapped to its panel's width.

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
        row[0].set_title("\n".join(_wrapped(e.get("title", "image"), 30, 3)), fontsize=9, parse_math=False)
        for ax, (title, m) in zip(row[1:], panels):
            m = (m - m.min()) / (m.max() - m.min() + 1e-12)
            ax.imshow(img)
            ax.imshow(m, cmap="jet", alpha=0.5, extent=(0, w, h, 0), interpolation="bilinear")
            ax.set_title(title, fontsize=9)
        for ax in row:
            ax.axis("off")
    return fig


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
