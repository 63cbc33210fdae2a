"""`train.py mode=stage` on 2 CPU processes (gloo), each recording what it writes into the run folder.

Launched by tests/training/test_single_stage.py, either directly (Lightning's `ddp` launcher then
starts rank 1 by re-running this command line, so this is a plain script, not pytest) or under
`torchrun` (both ranks start together, as under SLURM's srun). Every rank records, through a Python
audit hook, each file it opens for writing, renames or creates under RUN_DIR, plus any `torch.save`
to a path there (torch writes those files from C++, unseen by the hook), and at exit writes
`LOG_DIR/rank{r}.json`: {"rank", "events", "summary"}.

    python tests/helpers/ddp_single_stage_script.py LOG_DIR RUN_DIR [train.py arguments ...]
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def main(log_dir: str, run_dir: str, train_args: list[str]) -> None:
    roots = tuple({os.path.abspath(run_dir), os.path.realpath(run_dir)})
    # torchrun sets RANK; Lightning's launcher gives its children LOCAL_RANK (one node: the global rank)
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    record: dict = {"rank": rank, "events": [], "summary": None}

    def inside(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        p = os.path.abspath(os.fsdecode(path))  # string work only: no audited calls inside the hook
        return any(p == r or p.startswith(r + os.sep) for r in roots)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args[2] is not None and args[2] & _WRITE_FLAGS and inside(args[0]):
            record["events"].append(["write", os.fsdecode(args[0])])
        elif event == "os.rename" and (inside(args[0]) or inside(args[1])):  # os.rename and os.replace
            record["events"].append(["rename", os.fsdecode(args[0]), os.fsdecode(args[1])])
        elif event in ("os.mkdir", "os.remove", "os.rmdir") and inside(args[0]):
            record["events"].append([event, os.fsdecode(args[0])])

    sys.addaudithook(hook)
    import torch

    save = torch.save

    def recording_save(obj, f, *args, **kwargs):
        if inside(f):
            record["events"].append(["torch.save", os.fsdecode(f)])
        return save(obj, f, *args, **kwargs)

    torch.save = recording_save
    atexit.register(lambda: (Path(log_dir) / f"rank{rank}.json").write_text(json.dumps(record)))

    import runpy

    train_main = runpy.run_path(str(Path(__file__).resolve().parents[2] / "train.py"))["main"]

    record["summary"] = train_main(train_args)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
