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
    # the first run's steps are slowed (0.25 s each), so that stage 3 cannot finish between its first
    # checkpoint and the kill however fast the machine is
    slowed = [*_cmd(run_dir), "trainer.callbacks=[tests.helpers.slow_steps.SlowSteps]"]
    proc = subprocess.Popen(slowed, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    while not ckpt.exists():
        if proc.poll() is not None:
            pytest.fail(f"first run exited with {proc.returncode} before stage 3 wrote a checkpoint")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("no stage-3 checkpoint after 15 minutes")
        time.sleep(0.1)
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
    ck = torch.load(tiny_run["dir"] / "stage3" / "final.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 20  # max_steps of the tiny stage 3, no step lost or repeated
    # tiny's stage 3 uses loss_norm "running": its token count survived the kill (10 + 10 batches)
    assert ck["loss_norm_seen"][1] == 20 and ck["loss_norm_seen"][0] > 20


def test_a_run_from_scratch_gives_the_killed_and_resumed_run_s_metrics_byte_for_byte(tiny_run, tmp_path):
    # same config, seed, machine and thread count: deterministic (tiny.yaml: trainer.deterministic), and a
    # stage resumed from its last checkpoint continues exactly where the killed one stopped
    fresh = tmp_path / "tiny"
    done = subprocess.run(_cmd(fresh), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("eval/metrics.json", "llm/hf/model.safetensors", "encoder/encoder.pt"):
        assert (fresh / name).read_bytes() == (tiny_run["dir"] / name).read_bytes(), name
    for stage in ("stage1", "stage2", "stage3"):  # the weights (the config inside names the run folder)
        a, b = (torch.load(d / stage / "final.ckpt", map_location="cpu", weights_only=True)["state_dict"]
                for d in (fresh, tiny_run["dir"]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage


def test_checkpoints_are_trimmed_and_carry_the_config(tiny_run):
    for stage in ("stage1", "stage2", "stage3"):
        ck = torch.load(tiny_run["dir"] / stage / "final.ckpt", map_location="cpu", weights_only=True)
        keys = list(ck["state_dict"])
        assert keys and not any(k.startswith(("model.llm.", "model.vision.")) for k in keys), stage
        assert ck["run_config"]["run_dir"] == str(tiny_run["dir"])
    assert (tiny_run["dir"] / "config.yaml").exists()


def test_a_run_folder_copied_with_cp_a_retrains_nothing(tiny_run, tmp_path, monkeypatch):
    from expvl.configs import load_config
    from expvl.configs.schema import RunConfig
    from expvl.training import pipeline

    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(tiny_run["dir"]), str(copy)], check=True)
    steps = ("tokenizers", "llm", "encoder", "stage1", "stage2", "stage3")
    before = {s: (copy / s / "done.json").read_text() for s in steps}
    features = sorted(p.name for p in (copy / "features").iterdir())
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: {"headline": {}})  # evaluation is not the point
    pipeline.run_pipeline(load_config(RunConfig, ["tiny"], [f"run_dir={copy}"]))
    assert {s: (copy / s / "done.json").read_text() for s in steps} == before  # not one step redone
    assert sorted(p.name for p in copy.iterdir() if "." in p.name and p.is_dir()) == []  # nothing moved aside
    assert sorted(p.name for p in (copy / "features").iterdir()) == features  # the feature cache reused


def test_training_steps_log_losses_and_learning_rates(tiny_run):
    import csv
    for step in ("llm", "encoder", "stage1", "stage2", "stage3"):
        versions = sorted((tiny_run["dir"] / step / "logs").glob("version_*/metrics.csv"))
        assert versions, f"{step}: no metrics.csv"
        rows = list(csv.DictReader(versions[-1].open()))
        assert any(r.get("train/loss") for r in rows) and any(k.startswith("lr-") for k in rows[0]), step
    # the killed stage 3 resumed into a new version folder: the first run's rows are not rewritten
    assert len(list((tiny_run["dir"] / "stage3" / "logs").glob("version_*"))) == 2


def test_encoder_stand_in_never_saw_the_zero_shot_aus(tiny_run):
    supervised = json.loads((tiny_run["dir"] / "encoder" / "done.json").read_text())["aus"]
    metrics = json.loads((tiny_run["dir"] / "eval" / "metrics.json").read_text())
    assert metrics["zero_shot_aus"] and not set(metrics["zero_shot_aus"]) & set(supervised)
    assert set(metrics["seen_aus"]) <= set(supervised)


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
    import expvl

    gray = tmp_path / "face.png"
    Image.new("L", (97, 131), 128).save(gray)
    for image in (gray, happy_jpg):
        answer = expvl.load(tiny_run["dir"]).ask(image, "Is the inner brow raised?", max_new_tokens=5)
        assert isinstance(answer, str)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError, match="broken.jpg"):
        expvl.load(tiny_run["dir"]).ask(bad, "Is the inner brow raised?")


# ---- mode=stage: one stage of a real recipe, its parts read from local files --------------------------

def test_single_stage_trains_from_local_parts(tiny_run, tmp_path):
    """`train.py mode=stage`: the LLM folder, its SentencePiece model, a BERT vocab.txt and the data
    root given as paths (here the tiny run's own LLM and data, and a written vocab)."""
    tiny = tiny_run["dir"]
    vocab = tmp_path / "vocab.txt"
    words = ["is", "the", "a", "are", "inner", "outer", "brow", "raised", "lowered", "lip", "corner", "yes", "no",
             "face", "happy", "sad", "question", "answer", "?"]
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    run_dir = tmp_path / "stage"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", "tiny", "mode=stage", "stage=instruct",
           f"run_dir={run_dir}", f"data.root={tiny / 'data'}", f"pretrained.llm={tiny / 'llm' / 'hf'}",
           f"pretrained.llm_tokenizer={tiny / 'tokenizers' / 'llm.model'}", "pretrained.llm_dtype=fp32",
           f"pretrained.qformer_vocab={vocab}", "stage3.max_steps=3", "trainer.progress_bar=false",
           "random_init=[vision,qformer]"]
    done = subprocess.run(cmd, check=False, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ck = torch.load(run_dir / "stage3" / "final.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 3 and ck["stage"] == "instruct"
    words_seen = ck["state_dict"]["model.qformer.bert.embeddings.word_embeddings.weight"].shape[0]
    assert words_seen == 5 + len(words) + 1  # the vocab file's tokens + [DEC], not the tiny run's tokenizer
    assert not any(k.startswith(("model.llm.", "model.vision.")) for k in ck["state_dict"])
    done_json = json.loads((run_dir / "stage3" / "done.json").read_text())
    assert torch.isfinite(torch.tensor(done_json["final_loss"]))


# ---- VL-FAU on the tiny run's parts (vlfau_pipeline.py through train.py / eval.py) -------------------

def _vlfau_cmd(tiny_dir: Path, run_dir: Path, parts_yaml: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", "vlfau_synthfacs", f"parts_from={parts_yaml}",
            f"run_dir={run_dir}", "max_steps=12", "data.batch_size=8", "trainer.progress_bar=false",
            "trainer.val_check_interval=6", "trainer.limit_val_batches=1", "explain=3",
            "model.qformer.hidden_size=64", "model.qformer.intermediate_size=128", "model.qformer.num_query_tokens=4",
            *extra]


@pytest.fixture(scope="module")
def vlfau_parts(tiny_run, tmp_path_factory):
    """A config naming the tiny run folder, so its finished bootstrap steps are the VL-FAU parts."""
    path = tmp_path_factory.mktemp("vlfau") / "parts.yaml"
    path.write_text((REPO / "configs" / "tiny.yaml").read_text().replace("run_dir: runs/tiny",
                                                                          f"run_dir: {tiny_run['dir']}"))
    return path


def test_vlfau_trains_on_the_default_parts_and_reports_its_au_head(tiny_run, vlfau_parts, tmp_path, happy_jpg):
    import expvl
    from expvl.evaluation.compare import compare

    run_dir = tmp_path / "vl"
    done = subprocess.run(_vlfau_cmd(tiny_run["dir"], run_dir, vlfau_parts), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "moving it to" not in done.stderr  # the tiny run's bootstrap steps were reused, not rebuilt
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["metrics"]["au_macro_f1_classifier"] <= 1.0 and list(summary["parts"]) == ["main"]
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics["au_classifier"]["f1"]) <= set(json.loads((run_dir / "main" / "metrics.json").read_text())
                                                      ["au_classifier"]["support"])
    assert "AU head" in (run_dir / "eval" / "report.md").read_text()
    ck = torch.load(run_dir / "main" / "final.ckpt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("model.vision.") for k in ck["state_dict"])  # the frozen encoder is not saved
    assert any(k.startswith("model.llm.") for k in ck["state_dict"])  # the jointly trained language module is
    # the classifier's column next to the Q3 columns of the BLIP-2 run
    table = compare([tiny_run["dir"], run_dir])
    assert "vl: AU head" in table and "Q3 scoring" in table and table.count("\n") >= 4
    # eval.py on a VL-FAU run re-evaluates without retraining
    again = subprocess.run([sys.executable, str(REPO / "eval.py"), "--run", str(run_dir)], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["metrics"] == summary["metrics"]
    # one real face photo: probabilities for every AU, one sentence per predicted AU, a global text
    out = expvl.load(run_dir).explain(happy_jpg)
    assert len(out["probs"]) == 19 and sorted(out["local"]) == sorted(out["predicted"])
    assert out["predicted"] == [au for au, p in out["probs"].items() if p > 0.5]
    assert isinstance(out["global_text"], str) and 0.0 <= out["agreement"] <= 1.0


def test_vlfau_fold_protocol_trains_one_model_per_held_out_fold(tiny_run, vlfau_parts, tmp_path):
    from expvl.vocab.shards import read_split_records

    subjects = sorted({r.subject for recs in read_split_records(tiny_run["dir"] / "data").values() for r in recs})
    folds = tmp_path / "folds.json"
    folds.write_text(json.dumps({"dataset": "synthfacs", "folds": [subjects[0::3], subjects[1::3], subjects[2::3]]}))
    run_dir = tmp_path / "vl_folds"
    done = subprocess.run(_vlfau_cmd(tiny_run["dir"], run_dir, vlfau_parts, f"fold_protocol={folds}",
                                     "test_folds=[1,2,3]", "model.global_weight=0"),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(summary["parts"]) == ["fold1", "fold2", "fold3"]
    for k in (1, 2, 3):  # subject-exclusive: the held-out fold's subjects never trained fold k's model
        split = read_split_records(run_dir / f"fold{k}" / "data")
        held_out = {r.subject for r in split["test"]}
        assert held_out == set(subjects[k - 1::3]) and not held_out & {r.subject for r in split["train"]}
    head = json.loads((run_dir / "eval" / "metrics.json").read_text())["au_classifier"]
    assert head["folds"] == summary["parts"]
    per_fold = [json.loads((run_dir / f"fold{k}" / "metrics.json").read_text())["au_classifier"] for k in (1, 2, 3)]
    au = next(iter(head["f1"]))
    scored = [m["f1"][au] for m in per_fold if au in m["f1"]]
    assert head["f1"][au] == pytest.approx(sum(scored) / len(scored))  # each AU's F1 averaged over the folds
