"""Every dataset reader's output goes through the embedded default (`train.py --config tiny
synthesis.source=<reader> ...`): the data step, the stand-ins, the three stages and the report, on a tiny
folder in each reader's own layout. AU-only datasets (BP4D, DISFA, GFT, RAF-AU, EmotioNet) have no
emotion, emotion-only ones (AffectNet, RAF-DB) no AUs, RAF-DB compound only compound emotions, and
AffectNet / RAF-DB have no val split."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.helpers.own_data import WRITERS, write_reader_dataset

FAST = ["bootstrap.llm_steps=3", "bootstrap.encoder_steps=3", "stage1.max_steps=2", "stage2.max_steps=2",
        "stage3.max_steps=2", "eval.limit=8"]
AU_DATASETS = {"bp4d", "disfa", "gft", "rafau", "emotionet", "csv"}
EMOTION_DATASETS = {"affectnet", "rafdb", "csv"}


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(WRITERS))
def test_a_reader_s_records_train_and_evaluate_through_the_default_pipeline(source, tmp_path):
    overrides = write_reader_dataset(source, tmp_path / "dataset")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", "tiny", f"run_dir={tmp_path / 'run'}",
                           *overrides, *FAST], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "data" / "contact_sheet.png").exists() and (run / "eval" / "report.md").exists()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert ("au_vqa_scoring" in metrics) == (source in AU_DATASETS)
    assert ("emotion" in metrics) == (source in EMOTION_DATASETS)
    assert all((run / s / "final.ckpt").exists() for s in ("stage1", "stage2", "stage3"))
