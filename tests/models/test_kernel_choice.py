"""models/kernel_choice.py: measured kernel choices (with a fake timer: no timing is asserted), their
cache in memory and on disk, and the models that ask it (llm.linear, attention "auto", int8 engines)."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from expvl.models import kernel_choice as kc


def fake_timer(seconds: dict[str, float]):
    """A timer that runs each call (so candidates really execute) and reports the given seconds."""
    ran: list[str] = []

    def timer(name, fn):
        fn()
        ran.append(name)
        return seconds[name]

    timer.ran = ran
    return timer


@pytest.fixture
def forced(monkeypatch):
    """Install a process-wide KernelChoices whose timer makes `winner` the fastest candidate."""
    def install(winner: str, path=None) -> kc.KernelChoices:
        timer = fake_timer(_Winner(winner))
        choices = kc.KernelChoices(path, timer=timer, repeats=3)
        monkeypatch.setattr(kc, "choices", choices)
        return choices
    return install


class _Winner(dict):
    def __init__(self, winner: str):
        super().__init__()
        self.winner = winner

    def __missing__(self, name):
        return 1e-3 if name == self.winner else 1e-2


def calls(*names):
    return lambda: {n: (lambda: None) for n in names}


def test_choice_needs_the_margin_and_is_measured_once(tmp_path):
    timer = fake_timer({"a": 1.0, "b": 0.9, "c": 0.5})
    ch = kc.KernelChoices(tmp_path / "k.json", timer=timer, repeats=3, margin=1.15)
    assert ch.choose("op", (1,), calls("a", "b"), "a") == "a"  # 1.11x faster: within the margin, the default
    assert ch.choose("op", (2,), calls("a", "b", "c"), "a") == "c"  # 2x: chosen
    before = len(timer.ran)
    built = []
    assert ch.choose("op", (2,), lambda: built.append(1) or {}, "a") == "c" and not built  # cached: not rebuilt
    assert len(timer.ran) == before
    with pytest.raises(ValueError, match="default 'z' is not a candidate"):
        ch.choose("op", (3,), calls("a"), "z")


def test_deterministic_mode_always_runs_the_default_kernel(tmp_path):
    timer = fake_timer({"a": 1.0, "c": 0.1})
    ch = kc.KernelChoices(tmp_path / "k.json", timer=timer, repeats=3)
    torch.use_deterministic_algorithms(True)
    try:
        assert ch.choose("op", (1,), calls("a", "c"), "a") == "a" and not timer.ran  # nothing measured
    finally:
        torch.use_deterministic_algorithms(False)
    assert ch.choose("op", (1,), calls("a", "c"), "a") == "c"


def test_choices_persist_on_disk_per_cpu_and_threads(tmp_path, caplog):
    path = tmp_path / "sub" / "k.json"
    kc.KernelChoices(path, timer=fake_timer({"a": 1.0, "b": 0.1}), repeats=1).choose("op", (4, 5), calls("a", "b"), "a")
    data = json.loads(path.read_text())
    (key, entry), = data.items()
    assert entry["choice"] == "b" and kc.cpu_info().model in key and f"{torch.get_num_threads()} threads" in key
    again = kc.KernelChoices(path, timer=fake_timer({}), repeats=1)  # would fail (KeyError) if it measured
    assert again.lookup("op", (4, 5)) == "b"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="expvl.models.kernel_choice"):
        assert kc.KernelChoices(path).lookup("op", (4, 5)) is None
    assert "ignoring the kernel-choice cache" in caplog.text


def test_cpu_info_names_the_bf16_units():
    info = kc.cpu_info()
    assert info.model and info.describe().startswith(info.model)
    assert kc.CPUInfo("x", frozenset({"avx2", "avx512_bf16"})).bf16
    assert kc.CPUInfo("x", frozenset({"amx_bf16"})).bf16
    assert not kc.CPUInfo("x", frozenset({"avx2", "avx512f"})).bf16
    assert kc.CPUInfo("x", frozenset({"avx2"})).describe().endswith("avx512_bf16 amx_tile amx_bf16 amx_int8")


@pytest.mark.parametrize("kernel", ["F.linear", "W x^T", "oneDNN"])
@pytest.mark.parametrize("shape", [(1,), (2,), (2, 3), (8,), (5, 4)])
def test_linear_gives_f_linear_with_every_kernel(forced, kernel, shape):
    from expvl.models.llm import linear

    if kernel == "oneDNN" and not kc._has_onednn():
        pytest.skip("this torch build has no oneDNN linear")
    ch = forced(kernel)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(1024, 256, generator=g), torch.randn(1024, generator=g)  # MIN_WEIGHT elements
    x = torch.randn(*shape, 256, generator=g)
    with torch.no_grad():
        out = linear(x, w, b)
    assert out.shape == (*shape, 1024) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    rows = x.numel() // 256
    chosen = ch.lookup("linear fp32", (kc.rows_class(rows), 256, 1024))
    assert chosen == (kernel if rows <= kc.DECODE_ROWS or kernel != "W x^T" else "F.linear")


def test_linear_keeps_f_linear_for_autograd_small_and_low_precision(forced):
    from expvl.models.llm import linear

    ch = forced("oneDNN")
    w = torch.randn(1024, 256, requires_grad=True)
    x = torch.randn(4, 256)
    linear(x, w).sum().backward()  # autograd: F.linear, no choice made
    with torch.no_grad():
        linear(x, torch.randn(64, 256))  # below MIN_WEIGHT
        linear(x.bfloat16(), w.detach().bfloat16())  # not fp32
    assert ch.memory == {} and w.grad is not None


def test_a_kernel_with_wrong_results_is_never_a_candidate(monkeypatch):
    monkeypatch.setitem(kc.LINEAR_KERNELS, "W x^T", lambda x, w, b: F.linear(x, w) + 1)
    got = kc._linear_candidates(4, torch.randn(512, 512))
    assert "W x^T" not in got and "F.linear" in got


@pytest.mark.parametrize("winner", ["sdpa", "math"])
def test_attention_auto_on_cpu_runs_the_measured_backend_in_bf16(forced, winner, monkeypatch):
    from expvl.models import attention as attn

    ch = forced(winner)
    used = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", lambda *a, **k: used.append("sdpa") or real_sdpa(*a, **k))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, t, 16, generator=g).bfloat16().requires_grad_() for t in (5, 7, 7))
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, ..., :2] = False
    attn.attention(q, k, v, mask=mask)  # measures (running both candidates)
    used.clear()
    out = attn.attention(q, k, v, mask=mask)
    assert bool(used) == (winner == "sdpa")
    torch.testing.assert_close(out, attn.attention(q, k, v, mask=mask, backend="math"), rtol=2e-2, atol=2e-2)
    (key,) = [k for k in ch.memory if k.startswith("attention cpu")]
    assert "('bfloat16', 'fwd+bwd', 'mask', '-', '-', 8, 8, 8, 16)" in key  # buckets: B*H 8, Tq 5 -> 8, Tk 7 -> 8
    with torch.no_grad():
        attn.attention(q, k, v, mask=mask)
    assert sum(k.startswith("attention cpu") for k in ch.memory) == 2  # forward alone is its own choice


def test_attention_auto_in_fp32_is_sdpa_without_measuring(forced):
    from expvl.models.attention import attention

    ch = forced("math")
    q, k, v = (torch.randn(2, 4, t, 16, requires_grad=True) for t in (5, 7, 7))
    attention(q, k, v).sum().backward()
    assert kc.cpu_attention_backend(q, k, masked=False, causal=False, dropout_p=0.0, grad=True,
                                    attend=attention) == "sdpa"
    assert ch.memory == {}


def test_int8_engines_and_the_measured_choice(forced):
    from expvl.models.llm import LLaMA, LLMConfig
    from expvl.models.llm_int8 import int8_linears

    llm = LLaMA(LLMConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=128,
                          max_seq_len=32)).eval()
    ids = torch.tensor([[3, 5, 7, 9]])
    before = torch.backends.quantized.engine
    with torch.no_grad():
        ref = llm(input_ids=ids)["logits"]
        outs = {e: int8_linears(llm, engine=e)(input_ids=ids)["logits"] for e in ("x86", "onednn")}
        ch = forced("onednn")
        auto = int8_linears(llm)(input_ids=ids)["logits"]
    assert torch.backends.quantized.engine == before  # only set while packing
    for out in outs.values():
        assert (out - ref).abs().max() < 0.1 * ref.std()
    torch.testing.assert_close(auto, outs["onednn"], rtol=0, atol=0)
    assert [v["choice"] for k, v in ch.memory.items() if k.startswith("int8")] == ["onednn"]
    with pytest.raises(ValueError, match="engine 'qnnpack'"):
        int8_linears(llm, engine="qnnpack")


def test_autocast_choice_times_fp32_against_bf16(forced):
    forced("bf16-mixed")
    assert kc.cpu_autocast_choice(32, 64, rows=8)[0] == "bf16-mixed"
    forced("32-true")
    choice, ms = kc.cpu_autocast_choice(32, 64, rows=8)
    assert choice == "32-true" and set(ms) == {"32-true", "bf16-mixed"}
