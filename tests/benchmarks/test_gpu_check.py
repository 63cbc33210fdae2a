"""benchmarks/gpu_check.py on its CPU path: the checks it runs on a GPU, run here on the CPU at the tiny
size ("math" standing in for xformers, gloo for NCCL), and its exit without CUDA."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from expvl.configs import load_config
from expvl.configs.schema import RunConfig

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def gc():
    # the script imports its neighbour `common` as a script does (its folder first on the path): register
    # both under those names, as running `python benchmarks/gpu_check.py` would
    for name in ("common", "gpu_check"):
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small(gc):
    """Smaller than the embedded default (the same code paths) so that every stage runs in a second."""
    size = gc.tiny()
    return replace(size, qformer=replace(size.qformer, hidden_size=64, intermediate_size=128, num_layers=2),
                   llm=replace(size.llm, dim=64, hidden_dim=128, n_layers=1), batch=4, text=12)


def test_without_cuda_it_says_so_in_one_line_and_exits_0(gc, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]


@pytest.mark.parametrize("stage", ["pretrain", "caption", "instruct"])
def test_training_step_agrees_across_backends(gc, small, stage):
    cpu = torch.device("cpu")
    llm = None if stage == "pretrain" else gc.frozen_llm(small, cpu)
    a = gc.train_steps(stage, small, cpu, "sdpa", llm=llm, steps=1)
    b = gc.train_steps(stage, small, cpu, "math", llm=llm, steps=1)
    assert a["loss0"] > 0 and a["grad_norm0"] > 0 and a["steps_per_s"] > 0 and a["peak_mib"] is None
    assert gc.agree(a["loss0"], b["loss0"]) and gc.agree(a["grad_norm0"], b["grad_norm0"])
    if llm is not None:
        assert not any(p.requires_grad or p.grad is not None for p in llm.parameters())  # it stays frozen


def test_agree_is_a_bf16_tolerance(gc):
    assert gc.agree(2.0, 2.02) and gc.agree(-1.0, -1.01) and gc.agree(0.0, 5e-4)
    assert not gc.agree(2.0, 2.2) and not gc.agree(0.0, 0.01)


def test_inference_generates_and_scores(gc, small):
    r = gc.inference(small, torch.device("cpu"), "sdpa", llm=gc.frozen_llm(small, torch.device("cpu")), new_tokens=4)
    assert r["ok"] and r["tokens_per_s"] > 0 and r["images_per_s"] > 0


def test_ddp_step_matches_the_plain_step(gc, small):
    r = gc.ddp_step(torch.device("cpu"), "gloo", small)
    assert r["ok"] and r["loss"] > 0
    assert not torch.distributed.is_initialized()


def test_tiny_run_commands_are_valid_overrides(gc, tmp_path):
    """The train.py override list loads against the schema (trainer.precision=auto included)."""
    train, evaluate = gc.tiny_run_commands(tmp_path / "run", accelerator="cpu", device="cpu")
    overrides = [a for a in train if "=" in a]
    cfg = load_config(RunConfig, ["tiny"], overrides)
    assert cfg.trainer.precision == "auto" and cfg.run_dir == str(tmp_path / "run")
    assert evaluate[evaluate.index("--run") + 1] == str(tmp_path / "run") and "--device" in evaluate


def test_rows_report_a_disagreement(gc, small, monkeypatch):
    """A backend whose first step differs is marked FAILED in its row (and main() would exit 1)."""
    real = gc.train_steps

    def skewed(stage, size, device, backend, **kw):
        r = real(stage, size, device, backend, **kw)
        return r | {"loss0": r["loss0"] * 1.5} if backend == "math" else r

    monkeypatch.setattr(gc, "train_steps", skewed)
    monkeypatch.setattr(gc, "STAGES", ("pretrain",))
    rows = gc.rows_for_training(small, torch.device("cpu"), ("sdpa", "math"), None)
    assert len(rows) == 2 and "FAILED" in rows[1][-1] and "FAILED" not in rows[0][-1]
