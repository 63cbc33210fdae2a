"""Render the SLURM batch script (training/launch.sh) for an N-node x G-GPU DDP run, after checking it.

    export RUN_DIR=/scratch/runs/expblip1 DATA_ROOT=... EVA_VIT_G=... BERT_VOCAB=... BLIP2_STAGE1=...
    python -m expvl.training.slurm --nodes 2 --gpus-per-node 4 --config recipes/_blip2_vitg \
        --config recipes/expblip_stage1 --partition gpu --setup "source ~/venvs/expvl/bin/activate" \
        > stage1.sbatch && sbatch stage1.sbatch

Before it writes anything it runs what `train.py --dry-run` runs on the config the job will see (with the
trainer flags the script adds): an unknown config file, a misspelled key, a path that does not exist, a
frozen part that would start from random weights, or the embedded default (`mode: pipeline`, single
process) on more than one GPU each fail here, not in the queue. The environment variables the configs
read (`${oc.env:VAR}`) and are set now become required in the job too; the job's log goes into the run
folder (`<run_dir>/slurm-<job name>-<job id>.out`, the folder created here so SLURM can open it).
One task per GPU (Lightning's SLURMEnvironment wants --ntasks-per-node == trainer.devices and --nodes ==
trainer.num_nodes); the requeue-on-timeout mechanics are explained in launch.sh.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from expvl.configs import ConfigError, config_system, env_variables, load_config, read_yaml
from expvl.configs.schema import SCHEMAS
from expvl.training.dry_run import DryRunError, dry_run

TEMPLATE = Path(__file__).with_name("launch.sh")
SBATCH_OPTIONS = ("partition", "account", "qos", "mem", "constraint")  # passed through when given
_FIELD = re.compile(r"@([A-Z_]+)@")
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){1,2}$")  # sbatch --time: [D-]HH:MM[:SS]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def render_slurm(nodes: int, gpus_per_node: int, *, configs: Sequence[str] = ("default",),
                 overrides: Sequence[str] = (), job_name: str = "expvl", time: str = "24:00:00",
                 cpus_per_task: int = 8, precision: str = "bf16-mixed",
                 required_env: Sequence[str] = ("RUN_DIR",), signal_seconds: int = 300,
                 setup: str = "", log: str = "%x-%j.out", sbatch: dict[str, str] | None = None) -> str:
    """The sbatch script text (no checks of the config: see `checked_script`).

    Args:
        nodes, gpus_per_node: the allocation; one DDP rank per GPU.
        configs: `--config` names for train.py, merged left to right.
        overrides: extra `key=value` overrides, after the trainer ones.
        required_env: environment variables the job checks before it starts (paths the recipes read).
        signal_seconds: how long before the time limit SLURM warns (SIGUSR1): saving a checkpoint of an
            unfrozen ViT-g with its optimizer state takes minutes, not the 90 s of many examples.
        setup: a shell line run before train.py (e.g. activating the environment).
        log: the job's output file (sbatch --output).
        sbatch: extra #SBATCH options (partition, account, qos, mem, constraint).
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
    if signal_seconds < 10:
        raise ValueError(f"signal_seconds must be >= 10, got {signal_seconds}")
    extra = sbatch or {}
    unknown = sorted(set(extra) - set(SBATCH_OPTIONS))
    if unknown:
        raise ValueError(f"sbatch options {unknown}: use {list(SBATCH_OPTIONS)}")
    if "\n" in setup:
        raise ValueError("setup is one shell line")
    fields = {
        "JOB_NAME": job_name, "NODES": str(nodes), "GPUS_PER_NODE": str(gpus_per_node),
        "CPUS_PER_TASK": str(cpus_per_task), "TIME": time, "PRECISION": shlex.quote(precision),
        "REQUIRED_ENV": " ".join(required_env),
        "CONFIG_ARGS": " ".join(f"--config {shlex.quote(c)}" for c in configs),
        "OVERRIDES": " ".join(shlex.quote(o) for o in overrides),
        "SIGNAL_SECONDS": str(signal_seconds), "LOG": log,
        "SBATCH_EXTRA": "".join(f"#SBATCH --{k}={v}\n" for k, v in extra.items() if v),
        "SETUP": setup or "# (no setup line: the job runs with the environment sbatch was called from)",
    }
    text = TEMPLATE.read_text()
    missing = set(_FIELD.findall(text)) - set(fields)
    if missing:
        raise KeyError(f"{TEMPLATE}: template fields without a value: {sorted(missing)}")
    return _FIELD.sub(lambda m: fields[m.group(1)], text)


def checked_script(nodes: int, gpus_per_node: int, *, configs: Sequence[str], overrides: Sequence[str] = (),
                   precision: str = "bf16-mixed", required_env: Sequence[str] = (), **render) -> str:
    """The script for this allocation, after the checks of `train.py --dry-run` on the config the job will
    load; raises ConfigError or DryRunError naming what would fail."""
    trainer = [f"trainer.devices={gpus_per_node}", f"trainer.num_nodes={nodes}", "trainer.strategy=ddp",
               "trainer.accelerator=gpu", f"trainer.precision={precision}"]
    files = list(configs)
    system = config_system(files, overrides)
    if system not in SCHEMAS:
        raise ConfigError(f"system: {system!r} is not one of {sorted(SCHEMAS)}")
    cfg = load_config(SCHEMAS[system], files, [*trainer, *overrides])
    if getattr(cfg, "mode", "") == "pipeline" and nodes * gpus_per_node > 1:
        raise ConfigError("the embedded default (mode: pipeline) is single-process: its preparation steps have "
                          "no rank guard; run one stage of a recipe (mode: stage) on several GPUs")
    dry_run(cfg)
    read = sorted({var for f in files for var in env_variables(OmegaConf.to_container(read_yaml(f), resolve=False))
                   .values() if os.environ.get(var)})
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)  # SLURM opens the log there before the job starts
    required = list(dict.fromkeys(["RUN_DIR", *read, *required_env]))
    return render_slurm(nodes, gpus_per_node, configs=configs, overrides=overrides, precision=precision,
                        required_env=required, log=str(run_dir / "slurm-%x-%j.out"), **render)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m expvl.training.slurm", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--config", action="append", default=[], help="train.py --config names (default: default)")
    p.add_argument("--job-name", default="expvl")
    p.add_argument("--time", default="24:00:00", help="sbatch --time, [D-]HH:MM[:SS]")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="SIGUSR1 this long before the time limit: the checkpoint for the requeue (default 300)")
    p.add_argument("--setup", default="", help='a shell line run first, e.g. "source ~/venv/bin/activate"')
    for name in SBATCH_OPTIONS:
        p.add_argument(f"--{name}", default="", help=f"sbatch --{name}")
    p.add_argument("--require-env", action="append", default=[],
                   help="another environment variable the job must have (RUN_DIR and those the configs read are)")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed to train.py")
    a = p.parse_args(argv)
    try:
        script = checked_script(a.nodes, a.gpus_per_node, configs=a.config or ["default"], overrides=a.overrides,
                                precision=a.precision, required_env=a.require_env, job_name=a.job_name,
                                time=a.time, cpus_per_task=a.cpus_per_task, signal_seconds=a.signal_seconds,
                                setup=a.setup, sbatch={k: getattr(a, k) for k in SBATCH_OPTIONS})
    except (ConfigError, DryRunError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(script, end="")


if __name__ == "__main__":
    main()
