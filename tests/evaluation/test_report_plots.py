"""What the report's plots and tables tell a reader: FACS order, the chance line, labelled texts, no overlaps.

The figures are checked as matplotlib objects (what is drawn where), the PNGs themselves in test_report.py.
"""

import io
import itertools
import warnings

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from expvl.evaluation.metrics import AUMetrics
from expvl.evaluation.report import (
    attention_figure,
    au_f1_figure,
    face_title,
    gallery_figure,
    plot_text,
    write_report,
)
from expvl.vocab.records import Record


def test_face_titles_list_aus_in_facs_order_not_as_text():
    stored = Record(id="f", image="f.png", source="s", split="test", emotion="fear",
                    aus={au: 1 for au in ("AU4", "AU26", "AU1", "AU20", "AU2")} | {"AU5": 0})
    reread = Record.from_json(stored.to_json())  # a shard keeps its keys sorted as text
    assert reread.positive_aus == ["AU1", "AU2", "AU20", "AU26", "AU4"]
    assert face_title(reread.emotion, reread.positive_aus) == "fear: AU1, AU2, AU4, AU20, AU26"
    assert face_title(None, []) == "no emotion: no AU"


def test_the_always_yes_line_is_2p_over_1_plus_p_for_each_au():
    aus, positives, n = ["AU12", "AU2", "AU4"], {"AU2": 1, "AU4": 5, "AU12": 10}, 10
    targets = torch.tensor([[int(i < positives[au]) for au in aus] for i in range(n)])
    m = AUMetrics(aus)
    m.update(torch.zeros_like(targets), targets)
    fig = au_f1_figure({"au_vqa_scoring": m.compute()})
    (ax,) = fig.axes
    (marks,) = [c for c in ax.collections if c.get_gid() == "always-yes"]
    drawn = [(seg[:, 0].mean(), seg[0, 1]) for seg in marks.get_segments()]  # (bar position, height)
    expected = [2 * (positives[au] / n) / (1 + positives[au] / n) for au in ("AU2", "AU4", "AU12")]  # FACS order
    np.testing.assert_allclose(drawn, [(i, 100 * f1) for i, f1 in enumerate(expected)], atol=1e-9)
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "always 'yes'"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["AU2", "AU4", "AU12"]


def test_no_always_yes_line_where_a_section_has_none():
    fold_mean = {"f1": {"AU1": 0.5}, "macro_f1": 0.5, "support": {"AU1": 3}, "skipped": []}
    (ax,) = au_f1_figure({"au_classifier": fold_mean}).axes
    assert not [c for c in ax.collections if c.get_gid() == "always-yes"]


def test_plot_text_drops_what_the_font_cannot_draw():
    assert plot_text("a\x00b\u200bc\tline\n中 é ⁇") == "a b c line\n? é ⁇"


def _face(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _boxes(fig, artists):
    renderer = FigureCanvasAgg(fig).get_renderer()
    return [a.get_window_extent(renderer) for a in artists]


def _overlapping(boxes) -> list:
    return [(a, b) for a, b in itertools.combinations(boxes, 2)
            if a.width and b.width and a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1]


LONG_TITLE = face_title("fear", ["AU1", "AU2", "AU4", "AU5", "AU7", "AU20", "AU25", "AU26"])


def test_gallery_labels_generated_and_reference_texts_and_nothing_overlaps():
    gallery = [{"image": _face(i), "title": LONG_TITLE if i % 2 else "neutral: no AU",
                "text": "the inner brows are raised and the lips part " * (1 + 3 * (i % 3)),
                **({"reference": "The face shows strongly lifted inner brows."} if i != 2 else {})}
               for i in range(6)]
    gallery[1]["text"] = "costs $\\nocommand$ 中\x07 and $5"  # neither mathtext nor a glyph the font lacks
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Glyph 20013 missing from font(s)"
        fig = gallery_figure(gallery, columns=3)
        fig.savefig(io.BytesIO(), format="png")
    texts = [t.get_text() for t in fig.texts]
    assert texts.count("generated:") == 6 and texts.count("reference:") == 5
    assert "costs $\\nocommand$ ?  and $5" in texts
    drawn = fig.texts + [t for ax in fig.axes for t in [ax.title, *ax.texts]] + fig.axes
    assert _overlapping(_boxes(fig, drawn)) == []


def test_attention_titles_do_not_run_into_their_neighbours():
    yy, xx = np.mgrid[0:4, 0:4]
    entries = [{"image": _face(i), "title": LONG_TITLE,
                "attention": np.stack([np.exp(-((yy - q) ** 2 + (xx - q) ** 2)) for q in range(4)])} for i in range(2)]
    fig = attention_figure(entries)
    fig.canvas = FigureCanvasAgg(fig)
    fig.draw_without_rendering()  # the constrained layout places the titles
    assert _overlapping(_boxes(fig, [ax.title for ax in fig.axes] + fig.axes)) == []


def test_report_says_what_each_probe_column_is(tmp_path):
    probes = {"au": {"metric": "macro_f1", "probe": 0.4, "supervised": 0.5}}
    md = write_report(tmp_path, {"probes": probes})["report"].read_text()
    assert "| au | macro_f1 | 40.0 | 50.0 |" in md
    assert '- "probe": a linear classifier trained on the pooled outputs' in md
    assert '- "supervised": the same classifier on the pooled tokens of the frozen image encoder' in md
    assert '"instruct"' not in md  # explained only where the table has the column
    probes["au"]["instruct"] = 0.45
    md = write_report(tmp_path, {"probes": probes})["report"].read_text()
    assert "| task | metric | probe | supervised | instruct |" in md and "| 40.0 | 50.0 | 45.0 |" in md
    assert '- "instruct": the same classifier on the pooled query outputs of the stage-3 Q-Former' in md
    assert "## Linear probes" not in write_report(tmp_path, {"probes": {}})["report"].read_text()
