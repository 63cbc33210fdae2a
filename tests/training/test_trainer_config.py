"""Lightning's knobs through the typed schema (configs/schema.py TrainerConfig -> training/run_folder.py
`trainer`): accumulation, per-invocation max_time, gradient clipping, the logger, extra callbacks by import
path; and `train.py --print-config` / `--dry-run` / exit code 3 for a run cut short."""

import json
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from expvl.configs import ConfigError, load_config
from expvl.configs.schema import RunConfig
from expvl.training.run_folder import TrainingStopped, trainer
from tests.conftest import REPO


class Tiny(L.LightningModule):
    def __init__(self, pause: float = 0.0):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.pause = pause

    def training_step(self, batch, batch_idx):
        time.sleep(self.pause)
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n=64):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(n, 4)), batch_size=2)


def _cfg(*overrides):
    return load_config(RunConfig, ["tiny"], ["trainer.accelerator=cpu", *overrides])


def test_accumulation_counts_optimizer_steps_and_the_callback_comes_from_its_import_path(tmp_path):
    out = tmp_path / "seen.json"
    cb = json.dumps({"class_path": "tests.helpers.callbacks.BatchCounter", "init_args": {"out": str(out),
                                                                                          "tag": "mine"}})
    tr = trainer(_cfg("trainer.accumulate_grad_batches=4", f"trainer.callbacks=[{cb}]"), tmp_path / "step",
                 max_steps=3, grad_clip=0.0)
    tr.fit(Tiny(), _data())
    seen = json.loads(out.read_text())
    assert seen == {"tag": "mine", "batches": 12, "steps": 3}  # 4 batches per optimizer step


def test_gradient_clipping_is_the_step_s_unless_the_trainer_says_otherwise(tmp_path):
    assert trainer(_cfg(), tmp_path / "a", max_steps=1, grad_clip=1.5).gradient_clip_val == 1.5
    assert trainer(_cfg(), tmp_path / "b", max_steps=1, grad_clip=0.0).gradient_clip_val is None
    tr = trainer(_cfg("trainer.gradient_clip_val=0.25", "trainer.gradient_clip_algorithm=value"), tmp_path / "c",
                 max_steps=1, grad_clip=1.5)
    assert tr.gradient_clip_val == 0.25 and tr.gradient_clip_algorithm == "value"


@pytest.mark.parametrize("logger, written", [("csv", "logs/version_0/metrics.csv"),
                                             ("tensorboard", "logs/version_0/events.out.tfevents.*"),
                                             ("wandb", "logs/wandb/offline-run-*"), ("none", None)])
def test_each_logger_writes_where_it_says(tmp_path, logger, written, monkeypatch):
    if logger == "tensorboard":
        pytest.importorskip("tensorboard")
    if logger == "wandb":
        pytest.importorskip("wandb")
        monkeypatch.setenv("WANDB_SILENT", "true")
    step = tmp_path / "step"
    trainer(_cfg(f"trainer.logger={logger}", "trainer.log_every_n_steps=1"), step, max_steps=4,
            grad_clip=0.0).fit(Tiny(), _data())
    if written is None:
        assert not (step / "logs").exists()
    else:
        assert list(step.glob(written)), sorted(str(p.relative_to(step)) for p in step.rglob("*"))


def test_max_time_cuts_a_step_short_saves_it_and_a_rerun_resumes(tmp_path):
    step = tmp_path / "step"
    with pytest.raises(TrainingStopped, match=r"stopped at step \d+ of 1000 \(trainer.max_time\); rerun"):
        trainer(_cfg("trainer.max_time=00:00:00:01"), step, max_steps=1000, grad_clip=0.0).fit(Tiny(pause=0.05),
                                                                                                _data(4000))
    last = step / "checkpoints" / "last.ckpt"
    done = torch.load(last, weights_only=True)["global_step"]
    assert 0 < done < 1000
    # the budget is per invocation: a resumed run gets its own second, and goes on from where it stopped
    with pytest.raises(TrainingStopped):
        trainer(_cfg("trainer.max_time=00:00:00:01"), step, max_steps=1000, grad_clip=0.0).fit(
            Tiny(pause=0.05), _data(4000), ckpt_path=str(last))
    assert torch.load(last, weights_only=True)["global_step"] > done


@pytest.mark.parametrize("override, match", [
    ("trainer.accumulate_grad_batches=0", "accumulate_grad_batches must be >= 1"),
    ("trainer.max_time=2h", "max_time must be DD:HH:MM:SS"),
    ("trainer.gradient_clip_val=-1", "gradient_clip_val must be > 0"),
    ("trainer.gradient_clip_algorithm=l2", "gradient_clip_algorithm must be norm or value"),
    ("trainer.logger=mlflow", "logger must be one of"),
    ("trainer.callbacks=[42]", r"callbacks\[0\] must be 'package.module.Class'"),
])
def test_bad_trainer_settings_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(override)


def test_an_unknown_callback_is_named(tmp_path):
    with pytest.raises(ValueError, match="cannot import 'no.such.Callback'"):
        trainer(_cfg("trainer.callbacks=[no.such.Callback]"), tmp_path, max_steps=1, grad_clip=0.0)


def _train_py(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_print_config_and_dry_run_train_nothing(tmp_path):
    run_dir = tmp_path / "run"
    shown = _train_py("--config", "tiny", f"run_dir={run_dir}", "stage3.max_steps=7", "--print-config")
    assert shown.returncode == 0 and "max_steps: 7" in shown.stdout and not run_dir.exists()
    checked = _train_py("--config", "tiny", f"run_dir={run_dir}", "--dry-run")
    assert checked.returncode == 0 and json.loads(checked.stdout)["finished"] == [] and not run_dir.exists()
    missing = _train_py("--config", "tiny", "mode=stage", f"data.root={tmp_path / 'nowhere'}", "pretrained.qformer_vocab=/v",
                        "pretrained.llm=/l", "pretrained.llm_tokenizer=/t", "random_init=[vision,qformer]", "--dry-run")
    assert missing.returncode == 1 and "data.root:" in missing.stderr and "does not exist" in missing.stderr


@pytest.mark.slow
def test_train_py_exits_3_when_max_time_cuts_it_short_and_resumes(tmp_path):
    args = ["--config", "tiny", f"run_dir={tmp_path / 'run'}", "bootstrap.llm_steps=100000"]
    cut = _train_py(*args, "trainer.max_time=00:00:00:02")
    assert cut.returncode == 3 and "rerun the same command to resume" in cut.stderr
    assert (tmp_path / "run" / "llm" / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "run" / "llm" / "done.json").exists()
