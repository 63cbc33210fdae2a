"""Stage 1 under DDP equals stage 1 on one process (BLIP-2 §3.2 ITC over the global batch).

tests/helpers/ddp_stage1_script.py trains the tiny stage-1 model with Lightning `ddp` on 2 CPU processes
(gloo), 4 samples per rank; here the same model, seeded identically, sees all 8 samples on one
process. At step 0 (same weights, no dropout):
- ITC: each rank contrasts its 4 rows against the 8 gathered columns, so the mean over ranks of
  loss_itc equals the single-process loss_itc (this fails if gathering, the rank offset of the
  targets, or the gathered positives are wrong);
- ITG is a per-token mean and the ranks hold equally many tokens, so it matches as a mean too;
- ITM draws random negatives and is not compared.
After the steps, DDP must have left identical parameters on both ranks, different from the start.

The DDP part runs as a subprocess in a clean environment: Lightning's `ddp` launcher starts rank 1
by re-running the current command, which inside pytest would be pytest itself.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.ddp_stage1_script import GLOBAL_BATCH, TEXT_KEYS, GlobalBatch, build_lit, trainable

SCRIPT = Path(__file__).parents[1] / "helpers" / "ddp_stage1_script.py"
STEPS = 2


def single_process_step0() -> dict:
    """Losses of the first training step on the whole global batch, through the same Trainer path."""
    import lightning as L
    from torch.utils.data import DataLoader

    lit = build_lit()
    data = GlobalBatch(lit.model.vision.width)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(lit, train_dataloaders=DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False))
    return lit.records[0]


@pytest.mark.slow
def test_ddp_two_cpu_ranks_match_single_process_and_sync(tmp_path):
    # only what Python needs: inherited PYTEST_* / rank / SLURM variables would change what Lightning does
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR", "LANG") if k in os.environ}
    env["OMP_NUM_THREADS"] = "1"
    log = tmp_path / "ddp.log"
    with log.open("w") as out:  # a file, not a pipe: nobody reads while the reference runs
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), str(STEPS)], env=env,
                                cwd=Path(__file__).parents[2], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # rank 1 is rank 0's child: one group to stop
        try:
            ref = single_process_step0()  # meanwhile: the ranks spend most of their time importing
            proc.wait(timeout=150)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, log.read_text()[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(len(r["steps"]) == STEPS for r in ranks)
    # the DistributedSampler split the global batch: each sample on exactly one rank
    seen = sorted(k for r in ranks for k in r["steps"][0]["text_keys"])
    assert seen == sorted(TEXT_KEYS)

    first = [r["steps"][0] for r in ranks]
    assert first[0]["loss_itc"] != pytest.approx(first[1]["loss_itc"], abs=1e-4)  # the halves differ
    for key in ("loss_itc", "loss_itg"):
        ddp_mean = (first[0][key] + first[1][key]) / 2
        assert ddp_mean == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key

    # gradients were all-reduced: both ranks hold the same weights, and the weights moved
    p0, p1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    init = trainable(build_lit())
    assert p0.keys() == p1.keys() == init.keys()
    for name in p0:
        torch.testing.assert_close(p0[name], p1[name], rtol=0, atol=0, msg=f"{name} differs between ranks")
    moved = [n for n in p0 if not torch.equal(p0[n], init[n])]
    assert len(moved) > len(p0) // 2, f"only {len(moved)} of {len(p0)} trainable tensors changed"
