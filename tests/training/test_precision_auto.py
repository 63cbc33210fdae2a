"""trainer.precision: the schema refuses what Lightning does not know; "auto" is resolved in
training/run_folder.py for the machine (bf16-mixed only where bf16 products exist and measured
faster), and the choice is logged with its reason. The hardware is faked: no timing is asserted."""

import logging

import pytest
import torch

from expvl.configs import ConfigError, load_config
from expvl.configs.schema import RunConfig
from expvl.models import kernel_choice as kc
from expvl.training import run_folder
from expvl.training.run_folder import resolve_precision, trainer


def _cfg(*overrides):
    return load_config(RunConfig, [], list(overrides))


@pytest.fixture
def machine(monkeypatch):
    """Fake the CPU flags and which of fp32 / bf16 autocast a measurement finds faster."""
    def install(flags: set[str], faster: str = "bf16-mixed"):
        monkeypatch.setattr(run_folder, "_logged", set())
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(kc, "cpu_info", lambda: kc.CPUInfo("Fake CPU", frozenset(flags)))
        timer = lambda name, fn: 1e-3 if name == faster else 1e-2
        monkeypatch.setattr(kc, "choices", kc.KernelChoices(None, timer=timer, repeats=1))
    return install


def test_precision_is_validated_and_auto_accepted():
    assert _cfg("trainer.precision=auto").trainer.precision == "auto"
    assert _cfg("trainer.precision=bf16-mixed").trainer.precision == "bf16-mixed"
    with pytest.raises((ConfigError, ValueError), match="trainer.precision must be one of .*got 'fp8'"):
        _cfg("trainer.precision=fp8")


@pytest.mark.parametrize(("flags", "faster", "expected", "why"), [
    ({"avx2"}, "bf16-mixed", "32-true", "neither AMX-BF16 nor AVX512-BF16"),
    ({"avx2", "avx512_bf16"}, "bf16-mixed", "bf16-mixed", "has AVX512-BF16"),
    ({"avx2", "avx512_bf16", "amx_bf16"}, "bf16-mixed", "bf16-mixed", "has AMX-BF16"),
    ({"avx512_bf16"}, "32-true", "32-true", "ms in fp32"),  # bf16 units, but the shapes do not gain
])
def test_auto_on_the_cpu(machine, caplog, flags, faster, expected, why):
    machine(flags, faster)
    cfg = _cfg("trainer.precision=auto", "trainer.accelerator=cpu")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert resolve_precision(cfg) == expected
    assert f"trainer.precision=auto -> {expected}" in caplog.text and why in caplog.text
    assert "Fake CPU" in caplog.text


def test_auto_for_a_gpu_without_cuda_is_fp32(machine, caplog):
    machine({"avx512_bf16"})
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert resolve_precision(_cfg("trainer.precision=auto", "trainer.accelerator=gpu")) == "32-true"
    assert "no CUDA device" in caplog.text


def test_auto_on_cuda_follows_bf16_support(machine, monkeypatch):
    machine(set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    for supported, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, s=supported: s)
        assert resolve_precision(_cfg("trainer.precision=auto")) == expected


def test_explicit_precision_passes_through_and_reaches_the_trainer(machine, tmp_path):
    machine({"avx512_bf16"})
    assert resolve_precision(_cfg("trainer.precision=32-true")) == "32-true"
    tr = trainer(_cfg("trainer.precision=auto", "trainer.accelerator=cpu", "trainer.logger=none"), tmp_path,
                 max_steps=1, grad_clip=0.0)
    assert tr.precision == "bf16-mixed"
