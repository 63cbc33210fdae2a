"""The embedded default at `tiny` size, end to end, with a real kill in the middle of a stage.

One module-scoped run serves every test here: `python train.py --config tiny` is started as a
subprocess, killed (SIGKILL) once stage 3 has written a checkpoint, and run again with the same
command. The second run must skip the finished steps, resume stage 3 from its checkpoint, evaluate,
and leave a complete run folder behind.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", "tiny", f"run_dir={run_dir}"]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    ckpt = run_dir / "stage3" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_cmd(run_dir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    while not ckpt.exists():
        if proc.poll() is not None:
            pytest.fail(f"first run exited with {proc.returncode} before stage 3 wrote a checkpoint")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("no stage-3 checkpoint after 15 minutes")
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "stage3" / "done.json").exists(), "stage 3 finished before the kill"
    second = subprocess.run(_cmd(run_dir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"dir": run_dir, "log": second.stdout + second.stderr}


def test_rerun_skips_finished_steps_and_resumes_the_killed_stage(tiny_run):
    summary = json.loads((tiny_run["dir"] / "summary.json").read_text())
    for step in ("data", "tokenizers", "llm", "encoder", "stage1", "stage2"):
        assert summary["steps"][step] < 5, f"{step} was redone: {summary['steps'][step]} s"
    assert "Restored all states from the checkpoint" in tiny_run["log"]
    ck = torch.load(tiny_run["dir"] / "stage3" / "final.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 20  # max_steps of the tiny stage 3, no step lost or repeated


def test_checkpoints_are_trimmed_and_carry_the_config(tiny_run):
    for stage in ("stage1", "stage2", "stage3"):
        ck = torch.load(tiny_run["dir"] / stage / "final.ckpt", map_location="cpu", weights_only=False)
        keys = list(ck["state_dict"])
        assert keys and not any(k.startswith(("model.llm.", "model.vision.")) for k in keys), stage
        assert ck["run_config"]["run_dir"] == str(tiny_run["dir"])
    assert (tiny_run["dir"] / "config.yaml").exists()


def test_evaluation_report_exists(tiny_run):
    ev = tiny_run["dir"] / "eval"
    metrics = json.loads((ev / "metrics.json").read_text())
    assert 0.0 <= metrics["au_vqa_scoring"]["macro_f1"] <= 1.0
    assert metrics["q3_questions"] > 0
    report = (ev / "report.md").read_text()
    assert "macro" in report.lower()
    pngs = list(ev.glob("*.png"))
    assert pngs and all(Image.open(p).size[0] > 100 for p in pngs)


def test_ask_answers_about_a_written_face_and_a_real_photo(tiny_run, tmp_path, happy_jpg):
    from eval import ask

    gray = tmp_path / "face.png"
    Image.new("L", (97, 131), 128).save(gray)
    for image in (gray, happy_jpg):
        answer = ask(tiny_run["dir"], image, "Is the inner brow raised?", max_new_tokens=5)
        assert isinstance(answer, str)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError, match="broken.jpg"):
        ask(tiny_run["dir"], bad, "Is the inner brow raised?")
