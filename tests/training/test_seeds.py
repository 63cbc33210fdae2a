"""The seed table (training/seeds.py): statistics over runs, the claim rows, and an unfinished seed named."""

import json
import math

import pytest

from expvl.training import seeds


def _fake_run(folder, seed, f1, zero_shot):
    run = folder / f"seed{seed}"
    (run / "eval").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"seconds": 100.0 + seed, "metrics": {
        "au_macro_f1_scoring": f1, "au_macro_f1_zero_shot": zero_shot, "au_macro_f1_zero_shot_always_yes": 0.25}}))
    (run / "eval" / "metrics.json").write_text(json.dumps({
        "headline": {"au_macro_f1_zero_shot": zero_shot, "au_macro_f1_zero_shot_always_yes": 0.25},
        "probes": {"au": {"metric": "macro_f1", "probe": 0.6, "supervised": 0.5 + seed / 100, "instruct": 0.55}}}))


def test_table_gives_mean_sample_std_min_and_max():
    rows = seeds.table({0: {"a": 1.0, "b": 2.0}, 1: {"a": 3.0}, 2: {"a": 5.0, "b": float("nan")}})
    assert rows["a"] == {"mean": 3.0, "std": 2.0, "min": 1.0, "max": 5.0, "n": 3}
    assert rows["b"] == {"mean": 2.0, "std": 0.0, "min": 2.0, "max": 2.0, "n": 1}  # NaN and absent skipped


def test_claims_are_rows_of_one_run():
    c = seeds.claims({"headline": {"au_macro_f1_zero_shot": 0.5, "au_macro_f1_zero_shot_always_yes": 0.25},
                      "probes": {"emotion": {"metric": "accuracy", "probe": 0.9, "supervised": 0.7}}})
    assert c["zero_shot_f1_minus_always_yes"] == pytest.approx(0.25)
    assert c["probe_emotion_probe"] == 0.9 and c["probe_emotion_gain"] == pytest.approx(0.2)
    assert seeds.claims({}) == {}


def test_table_only_tabulates_finished_seeds_and_names_an_unfinished_one(tmp_path, capsys):
    for seed, (f1, zs) in enumerate([(0.70, 0.40), (0.66, 0.52), (0.68, 0.46)]):
        _fake_run(tmp_path, seed, f1, zs)
    rows = seeds.main(["--table-only", "--out", str(tmp_path), "--seeds", "0", "1", "2"])
    assert rows["au_macro_f1_scoring"]["mean"] == pytest.approx(0.68)
    assert rows["au_macro_f1_scoring"]["std"] == pytest.approx(0.02)
    assert rows["au_macro_f1_scoring"]["min"] == pytest.approx(0.66)
    assert rows["probe_au_instruct"]["n"] == 3 and rows["seconds"]["max"] == 102.0
    md = (tmp_path / "seeds.md").read_text()
    assert "| au_macro_f1_scoring | 0.680 | 0.020 | 0.660 | 0.700 | 3 |" in md
    saved = json.loads((tmp_path / "seeds.json").read_text())
    assert set(saved["runs"]) == {"0", "1", "2"} and not math.isnan(saved["table"]["seconds"]["mean"])
    with pytest.raises(SystemExit, match="seed3/summary.json"):
        seeds.main(["--table-only", "--out", str(tmp_path), "--seeds", "0", "3"])
