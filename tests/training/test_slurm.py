"""The SLURM launcher (training/slurm.py, training/launch.sh): rendered for 2 nodes x 4 GPUs, it is valid bash, asks SLURM for
what Lightning's SLURMEnvironment checks, and runs train.py through srun with the matching trainer
overrides (a stub `srun` on PATH records the command instead of launching anything)."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from expvl.training.slurm import checked_script, main, render_slurm

REPO = Path(__file__).resolve().parents[2]


def sbatch_options(script: str) -> dict[str, str]:
    opts = {}
    for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", script, re.MULTILINE):
        opts[m.group(1)] = m.group(2) or ""
    return opts


def train_command(script: str) -> list[str]:
    (line,) = [ln for ln in script.splitlines() if ln.startswith("srun ")]
    return shlex.split(line)


@pytest.fixture
def script() -> str:
    return render_slurm(2, 4, configs=["recipes/_blip2_vitg", "recipes/expblip_stage1"],
                        overrides=["stage1.batch_size=28", "text.prompt_template=Q: {} A:"],
                        required_env=["RUN_DIR", "DATA_ROOT"], time="1-00:00:00")


def test_renders_the_allocation_and_the_matching_trainer_flags(script):
    opts = sbatch_options(script)
    assert opts["nodes"] == "2" and opts["ntasks-per-node"] == "4" and opts["gpus-per-node"] == "4"
    assert opts["signal"] == "SIGUSR1@300" and "requeue" in opts and opts["time"] == "1-00:00:00"
    cmd = train_command(script)
    assert cmd[cmd.index("train.py") + 1:cmd.index("train.py") + 5] == [
        "--config", "recipes/_blip2_vitg", "--config", "recipes/expblip_stage1"]
    for flag in ("trainer.num_nodes=2", "trainer.devices=4", "trainer.strategy=ddp", "trainer.accelerator=gpu",
                 "trainer.precision=bf16-mixed", "stage1.batch_size=28", "text.prompt_template=Q: {} A:"):
        assert flag in cmd
    assert not re.search(r"@[A-Z_]+@", script)  # every template field filled
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_lightning_slurm_environment_accepts_the_rendered_allocation(script, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    opts, cmd = sbatch_options(script), train_command(script)
    devices = int(next(a for a in cmd if a.startswith("trainer.devices=")).split("=")[1])
    num_nodes = int(next(a for a in cmd if a.startswith("trainer.num_nodes=")).split("=")[1])
    # what srun sets on the third task of the second node
    monkeypatch.setenv("SLURM_NTASKS", str(int(opts["nodes"]) * int(opts["ntasks-per-node"])))
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", opts["ntasks-per-node"])
    monkeypatch.setenv("SLURM_NNODES", opts["nodes"])
    monkeypatch.setenv("SLURM_JOB_NAME", opts["job-name"])
    monkeypatch.setenv("SLURM_PROCID", "6")
    monkeypatch.setenv("SLURM_LOCALID", "2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert SLURMEnvironment.detect()
    env = SLURMEnvironment()
    assert env.auto_requeue and env.world_size() == 8 and env.global_rank() == 6
    env.validate_settings(num_devices=devices, num_nodes=num_nodes)
    with pytest.raises(ValueError, match="ntasks-per-node"):  # the check this render must satisfy
        env.validate_settings(num_devices=devices + 1, num_nodes=num_nodes)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_script_runs_train_py_through_srun_and_checks_its_environment(script, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (bin_dir / "srun").chmod(0o755)
    job = tmp_path / "job.sh"
    job.write_text(script)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_ARGS": str(tmp_path / "args"),
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]",
           "SLURM_CPUS_PER_TASK": "8", "RUN_DIR": str(tmp_path / "run"), "DATA_ROOT": str(tmp_path / "data"),
           "EXTRA_OVERRIDES": "seed=3 eval.limit=10"}
    done = subprocess.run(["bash", str(job)], check=False, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:3] == ["--kill-on-bad-exit=1", "python", "train.py"]
    assert "trainer.num_nodes=2" in args and "trainer.devices=4" in args
    assert "text.prompt_template=Q: {} A:" in args  # quoting survives bash
    assert args[-2:] == ["seed=3", "eval.limit=10"]

    del env["DATA_ROOT"]  # a required path missing: a clear error before anything is launched
    (tmp_path / "args").unlink()
    done = subprocess.run(["bash", str(job)], check=False, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "DATA_ROOT is not set" in done.stderr
    assert not (tmp_path / "args").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"nodes": 0, "gpus_per_node": 4}, "must be >= 1"),
    ({"nodes": 1, "gpus_per_node": 4, "time": "90 minutes"}, "HH:MM"),
    ({"nodes": 1, "gpus_per_node": 4, "job_name": "interactive"}, "not usable"),
    ({"nodes": 1, "gpus_per_node": 4, "required_env": ["RUN DIR"]}, "not environment variable names"),
])
def test_bad_arguments_fail_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        render_slurm(**kwargs)


# ---- the checks before the queue --------------------------------------------------------------------------

@pytest.fixture
def recipe_env(tmp_path, monkeypatch):
    """The files the Exp-BLIP stage-1 recipe reads, as empty stand-ins (the checks look at paths, not weights)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"counts": {"train": 3}}')
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nbrow\n")
    for name in ("eva_vit_g.pth", "blip2_pretrained.pth"):
        (tmp_path / name).touch()
    env = {"RUN_DIR": str(tmp_path / "run"), "DATA_ROOT": str(data), "BERT_VOCAB": str(vocab),
           "EVA_VIT_G": str(tmp_path / "eva_vit_g.pth"), "BLIP2_STAGE1": str(tmp_path / "blip2_pretrained.pth")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


STAGE1 = ["recipes/_blip2_vitg", "recipes/expblip_stage1"]


def test_a_checked_script_requires_what_the_recipe_reads_and_logs_into_the_run_folder(recipe_env, tmp_path):
    script = checked_script(2, 4, configs=STAGE1, signal_seconds=600, setup="source /opt/venv/bin/activate",
                            sbatch={"partition": "gpu", "account": "faces", "qos": "", "mem": "200G",
                                    "constraint": "a100"})
    opts = sbatch_options(script)
    assert opts["output"] == f"{tmp_path / 'run'}/slurm-%x-%j.out" and (tmp_path / "run").is_dir()
    assert opts["signal"] == "SIGUSR1@600" and opts["partition"] == "gpu" and opts["account"] == "faces"
    assert opts["mem"] == "200G" and opts["constraint"] == "a100" and "qos" not in opts  # empty: not passed
    required = re.search(r"^for var in (.*); do$", script, re.M).group(1).split()
    assert required[0] == "RUN_DIR" and set(required) == set(recipe_env)  # every variable the recipe read
    setup, cd = script.index("source /opt/venv/bin/activate"), script.index('cd "${REPO_DIR')
    assert setup < cd < script.index("\nsrun ")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


@pytest.mark.parametrize("configs, overrides, match", [
    (["default"], [], "single-process"),
    (["recipes/nonexist"], [], "recipes/nonexist not found"),
    (STAGE1, ["stage1.max_stepz=5"], r"unknown key 'stage1\.max_stepz'"),
    (STAGE1, ["model.vision.pretrained=/no/such/eva.pth"], r"model\.vision\.pretrained: /no/such/eva\.pth does not exist"),
])
def test_what_would_fail_in_the_queue_fails_at_render_time(recipe_env, configs, overrides, match, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--nodes", "2", "--gpus-per-node", "4", *sum((["--config", c] for c in configs), []), *overrides])
    assert exit_.value.code != 0 and re.search(match, capsys.readouterr().err)


def test_an_unset_variable_is_named_at_render_time(recipe_env, monkeypatch, capsys):
    monkeypatch.delenv("EVA_VIT_G")
    with pytest.raises(SystemExit):
        main(["--nodes", "1", "--gpus-per-node", "2", "--config", STAGE1[0], "--config", STAGE1[1]])
    assert "environment variable EVA_VIT_G is not set" in capsys.readouterr().err
