"""Cached pipeline steps: finished steps are skipped, changed inputs never resume old checkpoints."""

import pytest
import torch

from expvl.training.run_folder import Step, _resume_path


def _checkpoint(path, step: int = 1):
    """A minimal readable Lightning checkpoint: the resume point must load (weights only) to be chosen."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": step}, path)


def test_step_skips_when_done_and_moves_aside_on_changed_inputs(tmp_path):
    step = Step(tmp_path, "stage1", {"lr": 1e-3})
    assert not step.done
    _checkpoint(step.dir / "checkpoints" / "last.ckpt")
    assert _resume_path(step.dir) == str(step.dir / "checkpoints" / "last.ckpt")
    # same inputs, interrupted: the checkpoint is the resume point
    again = Step(tmp_path, "stage1", {"lr": 1e-3})
    assert not again.done and _resume_path(again.dir) is not None
    again.finish(loss=1.0)
    assert Step(tmp_path, "stage1", {"lr": 1e-3}).done
    # other inputs: the old folder is kept aside, the new step starts clean
    changed = Step(tmp_path, "stage1", {"lr": 5e-4})
    assert not changed.done and _resume_path(changed.dir) is None
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("stage1.")]
    assert len(aside) == 1 and (aside[0] / "done.json").exists()


def test_resume_prefers_the_newest_checkpoint_of_the_same_step(tmp_path):
    import os
    import time
    step = Step(tmp_path, "stage3", {})
    last = step.dir / "checkpoints" / "last.ckpt"
    _checkpoint(last)
    hpc = step.dir / "hpc_ckpt_1.ckpt"
    _checkpoint(hpc)
    now = time.time()
    os.utime(last, (now - 100, now - 100))
    assert _resume_path(step.dir) == str(hpc)


def test_a_copied_run_folder_keeps_its_cache_but_outside_paths_still_count(tmp_path):
    import shutil
    a, b = tmp_path / "a", tmp_path / "b"
    Step(a, "llm", {"data": str(a / "data"), "init": [str(a / "stage1" / "final.ckpt")]}).finish()
    shutil.copytree(a, b)
    # paths inside the run folder are hashed relative to it: the copy's finished step is reused
    assert Step(b, "llm", {"data": str(b / "data"), "init": [str(b / "stage1" / "final.ckpt")]}).done
    # a path outside the run folder is an input like any other: changing it rebuilds
    assert not Step(b, "llm", {"data": str(tmp_path / "elsewhere"), "init": [str(b / "stage1" / "final.ckpt")]}).done


def test_each_stage_streams_with_its_own_length_grouping(tmp_path):
    from expvl.configs import load_config
    from expvl.configs.schema import RunConfig
    from expvl.training.stages import stage_data_config
    cfg = load_config(RunConfig, ["tiny"], ["stage3.batch_size=12"])  # tiny groups stage 3 (4 batches)
    s1, s3 = stage_data_config(cfg, cfg.stage1, tmp_path), stage_data_config(cfg, cfg.stage3, tmp_path)
    assert s1.stream.group_by_length == 0 and s3.stream.group_by_length == cfg.stage3.group_by_length > 0
    assert s3.batch_size == 12 and s3.root == str(tmp_path) and cfg.data.stream.group_by_length == 0


def test_rebuilt_upstream_parts_rebuild_the_steps_after_them(tmp_path):
    """Steps name their inputs by content: the same paths with new contents are not 'done'."""
    from expvl.training.run_folder import built_from, data_fingerprint
    from expvl.vocab.records import Record
    from expvl.vocab.shards import write_shards

    run, data = tmp_path / "run", tmp_path / "run" / "data"

    def synthesize(cfg_hash: str, n: int) -> None:
        recs = [Record(id=f"r{i}", image=f"{i}.png", source="t", split="train") for i in range(n)]
        write_shards(data, {"train": recs}, cfg_hash=cfg_hash, seed=0, shard_size=10, image_root=str(data))

    synthesize("a", 3)
    Step(run, "encoder", {"data": data_fingerprint(data)}).finish()
    Step(run, "stage1", {"data": data_fingerprint(data)}).finish()
    Step(run, "stage2", {"init": built_from(run / "stage1")}).finish()
    assert Step(run, "encoder", {"data": data_fingerprint(data)}).done
    import shutil
    shutil.rmtree(data)  # what synthesis asks for before it writes another config's data there
    synthesize("b", 4)
    assert not Step(run, "encoder", {"data": data_fingerprint(data)}).done
    Step(run, "stage1", {"data": data_fingerprint(data)}).finish()  # stage 1 rebuilt at the same path
    assert not Step(run, "stage2", {"init": built_from(run / "stage1")}).done
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        data_fingerprint(tmp_path / "nowhere")


def test_a_given_encoder_file_replaces_the_stand_in(tmp_path):
    from expvl.configs import load_config
    from expvl.configs.schema import RunConfig
    from expvl.training.bootstrap import step_encoder
    weights = tmp_path / "open_clip_model.safetensors"
    cfg = load_config(RunConfig, ["tiny"], [f"run_dir={tmp_path / 'run'}", f"model.vision.pretrained={weights}"])
    assert step_encoder(cfg, tmp_path / "data") == weights
    assert not (tmp_path / "run" / "encoder").exists()  # nothing trained, nothing written
