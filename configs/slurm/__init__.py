"""Render the SLURM batch script (configs/slurm/launch.sh) for an N-node x G-GPU DDP run.

    python -m expvl.configs.slurm --nodes 2 --gpus-per-node 4 --config recipes/_blip2_vitg \
        --config recipes/expblip_stage1 > stage1.sbatch && sbatch stage1.sbatch

One task per GPU (Lightning's SLURMEnvironment wants --ntasks-per-node == trainer.devices and
--nodes == trainer.num_nodes); the requeue-on-timeout mechanics are explained in launch.sh.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

TEMPLATE = Path(__file__).with_name("launch.sh")
_FIELD = re.compile(r"@([A-Z_]+)@")
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){1,2}$")  # sbatch --time: [D-]HH:MM[:SS]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def render_slurm(nodes: int, gpus_per_node: int, *, configs: Sequence[str] = ("default",),
                 overrides: Sequence[str] = (), job_name: str = "expvl", time: str = "24:00:00",
                 cpus_per_task: int = 8, precision: str = "bf16-mixed",
                 required_env: Sequence[str] = ("RUN_DIR",)) -> str:
    """The sbatch script text.

    Args:
        nodes, gpus_per_node: the allocation; one DDP rank per GPU.
        configs: `--config` names for train.py, merged left to right.
        overrides: extra `key=value` overrides, after the trainer ones.
        required_env: environment variables the job checks before it starts (paths the recipes read).
    """
    if nodes < 1 or gpus_per_node < 1 or cpus_per_task < 1:
        raise ValueError(f"nodes, gpus_per_node and cpus_per_task must be >= 1, got {nodes}, {gpus_per_node}, "
                         f"{cpus_per_task}")
    if not _TIME.match(time):
        raise ValueError(f"time must be [D-]HH:MM[:SS] as sbatch --time, got {time!r}")
    if job_name in ("bash", "interactive") or not re.fullmatch(r"[\w.-]+", job_name):
        # Lightning treats these two names as interactive sessions and turns SLURM detection off
        raise ValueError(f"job_name {job_name!r} is not usable (word characters only, not bash/interactive)")
    bad = [v for v in required_env if not _ENV_NAME.match(v)]
    if bad:
        raise ValueError(f"not environment variable names: {bad}")
    if not configs:
        raise ValueError("give at least one config for train.py --config")
    fields = {
        "JOB_NAME": job_name, "NODES": str(nodes), "GPUS_PER_NODE": str(gpus_per_node),
        "CPUS_PER_TASK": str(cpus_per_task), "TIME": time, "PRECISION": shlex.quote(precision),
        "REQUIRED_ENV": " ".join(required_env),
        "CONFIG_ARGS": " ".join(f"--config {shlex.quote(c)}" for c in configs),
        "OVERRIDES": " ".join(shlex.quote(o) for o in overrides),
    }
    text = TEMPLATE.read_text()
    missing = set(_FIELD.findall(text)) - set(fields)
    if missing:
        raise KeyError(f"{TEMPLATE}: template fields without a value: {sorted(missing)}")
    return _FIELD.sub(lambda m: fields[m.group(1)], text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m expvl.configs.slurm", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--config", action="append", default=[], help="train.py --config names (default: default)")
    p.add_argument("--job-name", default="expvl")
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--require-env", action="append", default=[], help="env var the job must have (RUN_DIR always)")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed to train.py")
    a = p.parse_args(argv)
    print(render_slurm(a.nodes, a.gpus_per_node, configs=a.config or ["default"], overrides=a.overrides,
                       job_name=a.job_name, time=a.time, cpus_per_task=a.cpus_per_task, precision=a.precision,
                       required_env=["RUN_DIR", *a.require_env]), end="")
