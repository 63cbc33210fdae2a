"""A run folder recovers from a damaged resume point, and a run folder of one system opened as another
says what it is (training/run_folder.py, training/vlfau.py)."""

import logging

import lightning as L
import pytest
import torch

from expvl.configs import load_config, save_config
from expvl.configs.schema import RunConfig
from expvl.training.run_folder import PREVIOUS, RunKindError, Step, trainer
from expvl.training.vlfau import open_vlfau_run


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(step: Step, max_steps: int) -> None:
    cfg = load_config(RunConfig, ["tiny"], ["trainer.accelerator=cpu", "trainer.logger=none",
                                            "trainer.ckpt_every_n_steps=2"])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=2)
    trainer(cfg, step.dir, max_steps=max_steps, grad_clip=0.0).fit(Tiny(), data, ckpt_path=step.resume_path(),
                                                                    weights_only=True)


def _step_of(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_a_truncated_last_ckpt_falls_back_to_the_one_before_naming_it(tmp_path, caplog):
    step = Step(tmp_path, "stage1", {"lr": 0.1})
    _fit(step, max_steps=4)
    ckpts = step.dir / "checkpoints"
    last, previous = ckpts / "last.ckpt", ckpts / PREVIOUS
    assert _step_of(last) == 4 and _step_of(previous) == 2  # the one before is kept
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut short
    with caplog.at_level(logging.WARNING):
        again = Step(tmp_path, "stage1", {"lr": 0.1})
        assert again.resume_path() == str(previous)
    assert f"cannot read checkpoint {last}" in caplog.text and "last.ckpt.unreadable" in caplog.text
    assert not last.exists() and (ckpts / "last.ckpt.unreadable").exists()
    _fit(again, max_steps=6)  # resumes at step 2, and the bad file is never rotated over the good one
    assert _step_of(last) == 6 and _step_of(previous) == 4


def test_a_stage_resumed_in_a_copied_run_folder_goes_on_writing_its_last_ckpt(tmp_path):
    import shutil

    _fit(Step(tmp_path / "a", "stage1", {}), max_steps=2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the checkpoint's callback state names a's folder
    copy = Step(tmp_path / "b", "stage1", {})
    _fit(copy, max_steps=4)
    assert sorted(p.name for p in (copy.dir / "checkpoints").iterdir()) == ["last.ckpt", PREVIOUS]
    assert _step_of(copy.dir / "checkpoints" / "last.ckpt") == 4


def test_with_every_resume_point_unreadable_the_step_starts_over(tmp_path, caplog):
    step = Step(tmp_path, "stage1", {})
    (step.dir / "checkpoints").mkdir()
    (step.dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    (step.dir / "hpc_ckpt_1.ckpt").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert step.resume_path() is None
    assert "no readable checkpoint to resume from; the step starts over" in caplog.text
    assert "hpc_ckpt_1.ckpt" in caplog.text and "last.ckpt" in caplog.text


def test_a_reading_rank_moves_nothing(tmp_path):
    step = Step(tmp_path, "stage1", {})
    (step.dir / "checkpoints").mkdir()
    bad = step.dir / "checkpoints" / "last.ckpt"
    bad.write_bytes(b"")
    assert Step(tmp_path, "stage1", {}, writer=False).resume_path() is None and bad.exists()


def test_a_blip2_run_opened_as_a_vlfau_one_says_so(tmp_path):
    save_config(load_config(RunConfig, ["tiny"], [f"run_dir={tmp_path}"]), tmp_path / "config.yaml")
    with pytest.raises(RunKindError, match=r"is a blip2 run \(its config\.yaml says system: blip2\), not a VL-FAU"):
        open_vlfau_run(tmp_path)
