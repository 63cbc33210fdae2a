"""A run folder's resumable steps: what `python train.py` and the recipes write, and how reruns resume.

Every step writes its output under `run_dir/<step>/` with a `done.json` naming the hash of what it
was built from; a rerun skips finished steps, and a step whose inputs changed moves the old folder
aside and rebuilds. Inputs name their upstream parts by content (`data_fingerprint`, `built_from`),
never by path: a rebuilt upstream step has the same path and would otherwise leave every later step
looking finished. A killed training step resumes from its last checkpoint (Lightning `ckpt_path`,
always with `weights_only=True`: Lightning would otherwise leave the choice to torch's default, which an
environment variable can turn into a read that runs a pickled object's code); a checkpoint that
cannot be read is named, moved aside, and the one before it is used (`_resume_path`).
Each (re)start of a training step logs its losses and learning rates to
`<step>/logs/version_<n>/metrics.csv` (Lightning's CSVLogger; the `step` column is the global step).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from pathlib import Path

import lightning as L

from expvl.configs.schema import RunConfig
from expvl.models.convert.weights import CheckpointError
from expvl.training.checkpoints import read_checkpoint
from expvl.vocab.shards import atomic_write

log = logging.getLogger("pipeline")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _relative(obj, run_dir: Path):
    """Paths inside the run folder written relative to it, so a moved or copied run keeps its cache."""
    prefix = f"{run_dir}{os.sep}"
    if isinstance(obj, dict):
        return {k: _relative(v, run_dir) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_relative(v, run_dir) for v in obj]
    if isinstance(obj, (str, Path)) and str(obj).startswith(prefix):
        return str(obj)[len(prefix):]
    return obj


class Step:
    """A cached pipeline step in `run_dir/<name>/`, identified by the hash of its inputs.

    `inputs.json` is written when the step starts and `done.json` when it finishes. A rerun with the
    same inputs skips a finished step and resumes an unfinished one from its checkpoints; a folder
    built from other inputs is moved aside to `<name>.<old hash>` (never resumed, never deleted).

    Under DDP every rank builds the Step, and only global rank 0 (`writer=True`) moves, creates or
    writes anything. The other ranks cannot wait for it here: no process group exists before
    `Trainer.fit`, and Lightning's own launcher starts them only inside rank 0's `fit`. They read
    instead, and decide as rank 0 does whatever the interleaving: a folder with another hash is
    about to be moved aside, so for them the step is not done and has nothing to resume.
    """

    def __init__(self, run_dir: Path, name: str, inputs, *, writer: bool = True):
        self.dir, self.name, self.hash = run_dir / name, name, _hash(_relative(inputs, run_dir))
        self.t0 = time.time()
        self.writer = writer
        started = self.dir / "inputs.json"
        try:
            old = json.loads(started.read_text())["hash"]
        except FileNotFoundError:  # a new step, or rank 0 is moving an old folder aside right now
            old = None
        # no inputs.json: rank 0 moves nothing aside and keeps the folder, so every rank may resume from it
        self._ours = old in (None, self.hash)
        if not writer:
            return
        if not self._ours:
            aside = self.dir.with_name(f"{name}.{old}")
            log.warning("%s was built from other inputs (%s); moving it to %s and rebuilding",
                        self.dir, old, aside)
            self.dir.rename(aside)
            self._ours = True
        self.dir.mkdir(parents=True, exist_ok=True)
        if old != self.hash:  # rewriting an unchanged file would only give other ranks a torn read
            atomic_write(started, json.dumps({"hash": self.hash}).encode())  # readers: old or new, never torn

    @property
    def done(self) -> bool:
        return self._ours and (self.dir / "done.json").exists()

    def resume_path(self) -> str | None:
        """The checkpoint to resume from: the same on every rank, None for a folder being moved aside."""
        return _resume_path(self.dir, writer=self.writer) if self._ours else None

    def finish(self, **info) -> dict:
        if not self.writer:
            raise RuntimeError(f"{self.dir}: only the writing rank (global rank 0) finishes a step")
        info = {"hash": self.hash, "seconds": round(time.time() - self.t0, 1), **info}
        atomic_write(self.dir / "done.json", json.dumps(info, indent=1).encode())
        return info

    def info(self) -> dict:
        return json.loads((self.dir / "done.json").read_text())


class RunKindError(ValueError):
    """A run folder of another system than the one asked for (a BLIP-2 run where a VL-FAU one is needed)."""


class TrainingStopped(RuntimeError):
    """A training step ended before its max_steps (trainer.max_time): its last.ckpt is saved, the step is not
    finished, and rerunning the same command resumes it."""


class _TimeBudget(L.pytorch.callbacks.Callback):
    """trainer.max_time, per invocation: once this fit has run that long, stop after the current step (all
    ranks agree), save the resume point and raise TrainingStopped, so that a step cut short is never taken
    for a finished one. (Lightning's own max_time counts the time of earlier runs restored from the
    checkpoint, so a resumed run would stop at once.)"""

    def __init__(self, max_time: str | None, last: Path):
        self.seconds = None if max_time is None else sum(int(v) * s for v, s in zip(max_time.split(":"),
                                                                                     (86400, 3600, 60, 1)))
        self.last = last
        self.t0 = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.seconds is not None:
            out_of_time = time.monotonic() - self.t0 >= self.seconds
            trainer.should_stop = trainer.should_stop or trainer.strategy.reduce_boolean_decision(out_of_time,
                                                                                                  all=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if 0 < trainer.max_steps and trainer.global_step < trainer.max_steps and not trainer.interrupted:
            trainer.save_checkpoint(self.last)  # every rank calls it; Lightning writes on rank 0
            raise TrainingStopped(f"{self.last.parent.parent}: stopped at step {trainer.global_step} of "
                                  f"{trainer.max_steps} (trainer.max_time); rerun the same command to resume")


def _callback(spec) -> L.pytorch.callbacks.Callback:
    """A callback from its import path ("package.module.Class") or {class_path, init_args}."""
    path, kwargs = (spec["class_path"], spec.get("init_args") or {}) if isinstance(spec, dict) else (spec, {})
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"trainer.callbacks: cannot import {path!r} ({type(e).__name__}: {e})") from None
    return cls(**kwargs)


def _logger(name: str, out_dir: Path):
    """A new version_<n> per (re)start: a resumed run never rewrites the rows of the one before it."""
    loggers = L.pytorch.loggers
    make = {"csv": lambda: loggers.CSVLogger(save_dir=out_dir, name="logs"),
            "tensorboard": lambda: loggers.TensorBoardLogger(save_dir=out_dir, name="logs"),
            # offline: nothing leaves the machine; `wandb sync <dir>` uploads the run later
            "wandb": lambda: loggers.WandbLogger(save_dir=out_dir / "logs", name=out_dir.name, offline=True),
            "none": lambda: False}
    try:
        return make[name]()
    except ModuleNotFoundError as e:
        raise ValueError(f"trainer.logger={name} needs the {e.name!r} package: pip install '.[logging]'") from None


def trainer(cfg: RunConfig, out_dir: Path, *, max_steps: int, grad_clip: float) -> L.Trainer:
    """The Trainer of one training step of a run folder, checkpointing into `out_dir/checkpoints` (last.ckpt
    is the resume point) and logging to `out_dir/logs`; `grad_clip` is the step's own clipping, which
    trainer.gradient_clip_val overrides."""
    t = cfg.trainer
    last = out_dir / "checkpoints" / "last.ckpt"
    logger = _logger(t.logger, out_dir)
    # no version counter: a copied run folder restores another dirpath, and Lightning would then write
    # last-v1.ckpt beside the last.ckpt it had resumed from, which the next rerun would resume from again
    callbacks = [_ResumePoint(dirpath=last.parent, save_last=True, every_n_train_steps=t.ckpt_every_n_steps,
                              save_top_k=0, enable_version_counter=False),
                 _TimeBudget(t.max_time, last), *(_callback(c) for c in t.callbacks)]
    if logger is not False:  # learning rates go where the losses go
        callbacks.append(L.pytorch.callbacks.LearningRateMonitor(logging_interval="step"))
    clip = t.gradient_clip_val if t.gradient_clip_val is not None else (grad_clip or None)
    return L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                     precision=resolve_precision(cfg), max_steps=max_steps, max_epochs=-1,
                     callbacks=callbacks, log_every_n_steps=t.log_every_n_steps, default_root_dir=str(out_dir),
                     enable_progress_bar=t.progress_bar, enable_model_summary=False,
                     accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=clip,
                     gradient_clip_algorithm=t.gradient_clip_algorithm if clip else None,
                     deterministic=t.deterministic or None,
                     num_sanity_val_steps=0, limit_val_batches=t.limit_val_batches,
                     val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
                     logger=logger)


def resolve_precision(cfg) -> str:
    """trainer.precision, with "auto" resolved for this machine and logged with the reason: bf16-mixed
    where the hardware runs bf16 products and a training step at the Q-Former's size measured faster
    in it (the one model size every step of a run trains at; configs/schema.py TrainerConfig), else
    32-true."""
    t = cfg.trainer
    if str(t.precision) != "auto":
        return t.precision
    precision, why = _auto_precision(t.accelerator, cfg.model.qformer)
    if (precision, why) not in _logged:
        _logged.add((precision, why))
        log.info("trainer.precision=auto -> %s: %s", precision, why)
    return precision


_logged: set[tuple[str, str]] = set()


def _auto_precision(accelerator: str, qformer) -> tuple[str, str]:
    import torch

    from expvl.models.kernel_choice import cpu_autocast_choice, cpu_info

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            return "32-true", "no CUDA device is visible"
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"CUDA device {name} runs bf16"
        return "32-true", f"CUDA device {name} has no bf16 support"
    if accelerator not in ("cpu", "auto"):
        return "32-true", f"no bf16 rule for accelerator {accelerator!r}"
    cpu = cpu_info()
    if not cpu.bf16:
        return "32-true", f"CPU {cpu.model!r} has neither AMX-BF16 nor AVX512-BF16 (bf16 products would be emulated)"
    units = "AMX-BF16" if "amx_bf16" in cpu.flags else "AVX512-BF16"
    D, I = qformer.hidden_size, qformer.intermediate_size
    choice, ms = cpu_autocast_choice(D, I)
    return choice, (f"CPU {cpu.model!r} has {units}; a training step of a {D}->{I}->{D} feed-forward block took "
                    f"{ms.get('32-true', float('nan')):.2f} ms in fp32 and {ms.get('bf16-mixed', float('nan')):.2f} "
                    f"ms under bf16 autocast (measured on this machine, cached)")


def trainer_loss(lit: L.LightningModule) -> float:
    """The last logged training loss of a fitted module (NaN if none was logged)."""
    m = lit.trainer.callback_metrics if lit.trainer else {}
    return float(m.get("train/loss", float("nan")))


PREVIOUS = "previous.ckpt"  # the resume point before last.ckpt, beside it


class _ResumePoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's periodic last.ckpt, keeping the one before it as previous.ckpt.

    Lightning writes each file whole (through a temporary file), so a kill never leaves a half-written
    last.ckpt; but a disk that fills up, a copy cut short or a file edited by hand can damage it later,
    and then the rerun resumes from the one before instead of starting the step over. The price is a
    second resume file on disk.
    """

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        last = Path(filepath)
        if trainer.is_global_zero and last.name == "last.ckpt" and last.exists():
            os.replace(last, last.with_name(PREVIOUS))
        super()._save_checkpoint(trainer, filepath)


def _resume_path(out_dir: Path, *, writer: bool = True) -> str | None:
    """The resume point: of our last.ckpt, the previous.ckpt before it and those Lightning wrote on SLURM's
    SIGUSR1, the readable one of the highest global step (the newest on a tie).

    A file that cannot be read (cut short, not a checkpoint, or holding code: read weights-only) is named in
    the log and, by the writing rank, renamed to `<name>.unreadable`: it no longer blocks the rerun, and is
    never rotated over a good previous.ckpt. Every rank decides alike, whether or not rank 0 renamed it yet.
    """
    found = [p for p in [out_dir / "checkpoints" / "last.ckpt", out_dir / "checkpoints" / PREVIOUS,
                         *out_dir.glob("hpc_ckpt_*.ckpt")] if p.exists()]
    readable = []
    for p in found:
        try:
            step = read_checkpoint(p, mmap=True).get("global_step", -1)
        except (CheckpointError, OSError) as e:  # OSError: rank 0 renamed it while this rank read it
            aside = p.with_name(f"{p.name}.unreadable")
            log.warning("%s; it is moved to %s, and the step resumes from an earlier checkpoint if there is one",
                        e, aside.name)
            if writer:
                p.replace(aside)
            continue
        readable.append((step, p.stat().st_mtime, p))
    if found and not readable:
        log.warning("%s: no readable checkpoint to resume from; the step starts over", out_dir)
    return str(max(readable)[2]) if readable else None


def data_fingerprint(data_root: Path | str) -> str:
    """What a synthesized data folder holds, for step keys: the hash of its manifest (synthesis config
    hash, shard files, counts). A folder rewritten from another config gets another fingerprint."""
    manifest = Path(data_root) / "manifest.json"
    try:
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        raise FileNotFoundError(f"{manifest} not found: {data_root} is not a data folder written by "
                                "`python -m expvl.synthesis`") from None


def built_from(step_dir: Path) -> str:
    """The input hash a finished step recorded: how later steps name it in their own inputs."""
    return json.loads((Path(step_dir) / "done.json").read_text())["hash"]
