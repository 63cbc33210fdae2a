"""The stream under real torch.distributed: 2 gloo processes x 2 DataLoader workers.

The test launches this file as a script in a clean environment (no inherited rank variables);
the script starts two ranks with torch.multiprocessing, each runs one full epoch, then a second
epoch interrupted after 3 batches, checkpointed through the gathered `StreamProgress` state and
resumed in fresh datasets. Each rank writes what it saw to JSON for the test to check.
"""

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

WORLD, WORKERS, BATCH, N = 2, 2, 3, 40


def rank_main(rank: int, root: str, out: str, port: int) -> None:
    import torch.distributed as dist

    from expvl.datamodules.stream import StreamConfig, StreamDataset, StreamProgress

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cfg = StreamConfig(seed=11, buffer_size=4)
    # rank and world size come from the process group
    ds = StreamDataset(root, split="train", config=cfg, num_workers=WORKERS)
    full = [[r.id for r in b["records"]] for b in ds.loader(batch_size=BATCH)]
    ds.set_epoch(1)  # nothing above was consumed; start epoch 1 explicitly

    first = []
    for batch in ds.loader(batch_size=BATCH):
        if len(first) == 3:
            break
        ds.progress.consume(batch["_pos"])
        first.append([r.id for r in batch["records"]])
    state = ds.progress.state_dict(gather_ranks=True)  # collective, as in Trainer.save_checkpoint
    saved = json.loads(json.dumps(state)) if rank == 0 else None
    objs = [saved]
    dist.broadcast_object_list(objs, src=0)  # every rank resumes from rank 0's checkpoint
    progress = StreamProgress()
    progress.load_state_dict(objs[0])
    resumed = StreamDataset(root, split="train", config=cfg, num_workers=WORKERS, progress=progress)
    rest = []
    for batch in resumed.loader(batch_size=BATCH):
        progress.consume(batch["_pos"])
        rest.append([r.id for r in batch["records"]])
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"full": full, "first": first, "rest": rest, "state": state, "epoch_after": progress.epoch,
         "num_batches": ds.num_batches(BATCH)}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_two_workers_exactly_once_and_equal_batches(tmp_path):
    from tests.helpers.datasets import write_dataset

    root = write_dataset(tmp_path / "d", N, 3)
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR", "LANG") if k in os.environ}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, __file__, str(root), str(tmp_path), str(free_port())],
        env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    want = Counter(f"r{i:04d}" for i in range(N))

    # one epoch: every record exactly once across ranks, equal batch counts per rank
    assert Counter(i for r in ranks for b in r["full"] for i in b) == want
    assert [len(r["full"]) for r in ranks] == [r["num_batches"] for r in ranks] == [8, 8]  # 10/worker -> 4 each

    # interrupted epoch: the gathered checkpoint holds all 4 slots, resuming sees the rest exactly
    assert [s for s, _, _ in ranks[0]["state"]["consumed"]] == [0, 1, 2, 3]
    assert Counter(i for r in ranks for b in r["first"] + r["rest"] for i in b) == want
    assert len(ranks[0]["rest"]) == len(ranks[1]["rest"]) == 5
    assert [r["epoch_after"] for r in ranks] == [2, 2]
    assert ranks[0]["first"][0] != ranks[0]["full"][0]  # epoch 1 is shuffled differently


if __name__ == "__main__":
    import torch.multiprocessing as mp

    root, out, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # fork, not spawn: the ranks inherit the imported torch instead of importing it again (the
    # slow part on a loaded 2-core machine); nothing has started threads yet at this point.
    mp.start_processes(rank_main, args=(root, out, port), nprocs=WORLD, join=True, start_method="fork")
