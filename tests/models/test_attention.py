"""The attention function: every backend computes the same numbers for every kind of mask."""

import logging

import pytest
import torch

from expvl.models import attention as attn_mod
from expvl.models.attention import attention, build_bias, resolve_backend


def _qkv(B=2, H=4, Hkv=4, Tq=5, Tk=7, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Tq, hd, generator=g), torch.randn(B, Hkv, Tk, hd, generator=g),
            torch.randn(B, Hkv, Tk, hd, generator=g))


def _masks(B, Tq, Tk):
    g = torch.Generator().manual_seed(1)
    key_pad = torch.ones(B, Tk, dtype=torch.bool)
    key_pad[0, :3] = False  # left padding in the first sequence
    boolean = torch.rand(B, 1, Tq, Tk, generator=g) > 0.3
    boolean[..., 0] = True  # keep one visible key per row so the reference below is well defined
    return {
        "none": None,
        "key_padding": key_pad[:, None, None, :],
        "boolean_full": boolean,
        "additive": torch.where(boolean, 0.0, -1e4),
        "per_head": torch.rand(B, 4, Tq, Tk, generator=g) > 0.5,
    }


@pytest.mark.parametrize("kind", ["none", "key_padding", "boolean_full", "additive", "per_head"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_sdpa_equals_math(kind, causal, Hkv):
    q, k, v = _qkv(Hkv=Hkv)
    mask = _masks(2, 5, 7)[kind]
    a = attention(q, k, v, mask=mask, causal=causal, backend="sdpa")
    b = attention(q, k, v, mask=mask, causal=causal, backend="math")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(a).all()


def test_math_matches_explicit_softmax_with_gqa():
    q, k, v = _qkv(Hkv=2)
    mask = _masks(2, 5, 7)["boolean_full"]
    out = attention(q, k, v, mask=mask, backend="math")
    k2, v2 = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ k2.transpose(-1, -2)) / 8 ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out, s.softmax(-1) @ v2, atol=1e-5, rtol=1e-5)


def test_causal_is_bottom_right_aligned_for_kv_cache():
    # 2 new queries over 6 keys: query 0 sees keys 0..4, query 1 sees keys 0..5
    bias = build_bias(None, causal=True, tq=2, tk=6, dtype=torch.float32, device=torch.device("cpu"))
    visible = bias == 0
    assert visible.tolist() == [[True] * 5 + [False], [True] * 6]
    # and the cached computation equals the last rows of the full causal computation
    q, k, v = _qkv(Tq=6, Tk=6)
    full = attention(q, k, v, causal=True, backend="math")
    last = attention(q[:, :, -2:], k, v, causal=True, backend="sdpa")
    torch.testing.assert_close(full[:, :, -2:], last, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("kind", ["none", "key_padding"])
def test_single_query_decode_step_sees_every_key_and_keeps_the_mask(backend, kind):
    # a decode step (Tq = 1) with causal=True: every cached key is visible (no causal bias is built),
    # and a padding mask still applies: equal to the last row of the full causal computation
    q, k, v = _qkv(Tq=7, Tk=7)
    mask = _masks(2, 7, 7)[kind]
    full = attention(q, k, v, mask=mask, causal=True, backend="math")
    step = attention(q[:, :, -1:], k, v, mask=mask, causal=True, backend=backend)
    torch.testing.assert_close(full[:, :, -1:], step, atol=1e-5, rtol=1e-5)

def test_fully_masked_row_is_finite_and_same_in_all_backends():
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, 0, 2] = False  # one query row sees nothing (a left-padding position)
    a = attention(q, k, v, mask=mask, backend="sdpa")
    b = attention(q, k, v, mask=mask, backend="math")
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_sdpa_and_math_identically():
    grads = []
    for backend in ("sdpa", "math"):
        q, k, v = (t.clone().requires_grad_() for t in _qkv(Hkv=2))
        # right padding, so no query row is fully masked (such rows are discarded by every
        # caller, and their gradients are backend-specific noise)
        keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
        keep[0, ..., -2:] = False
        attention(q, k, v, mask=keep, causal=True, backend=backend).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_xformers_falls_back_with_logged_reason(caplog):
    attn_mod._warned.clear()
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger="expvl.models.attention"):
        out = attention(q, k, v, causal=True, backend="xformers")
    torch.testing.assert_close(out, attention(q, k, v, causal=True, backend="math"), atol=1e-5, rtol=1e-5)
    assert "xformers" in caplog.text and "using 'sdpa'" in caplog.text
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"


def test_bad_arguments_raise():
    q, k, v = _qkv(Hkv=3)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q[:, :4], k, v)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(*_qkv(), backend="flash3")
