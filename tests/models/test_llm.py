"""models/llm.py against transformers' LlamaForCausalLM (the test-only oracle), plus invariants:
KV-cache decoding == full forward, attention backends agree, gradients reach inputs_embeds only."""


import pytest
import torch
import torch.nn.functional as F

from expvl.models.llm import KVCache, LLaMA, LLMConfig, RopeScaling, rope_inv_freq
from tests.helpers.llm import hf_tiny, left_padded, single_thread  # noqa: F401  (autouse fixture)

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "mha-untied": dict(num_key_value_heads=4),
    "gqa-tied-linear": dict(num_key_value_heads=2, tie_word_embeddings=True,
                            rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "gqa-untied-llama3": dict(num_key_value_heads=1, rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mha-bias": dict(num_key_value_heads=4, attention_bias=True),
}


def hf_positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    hf, ours = hf_tiny(tmp_path, **VARIANTS[variant])
    assert (ours.lm_head is None) == bool(VARIANTS[variant].get("tie_word_embeddings"))
    ids, mask = left_padded()
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = ours(input_ids=ids)["logits"]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        # left padding: HF generation passes positions from the mask; only real positions are meaningful
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        out = ours(input_ids=ids, attention_mask=mask)["logits"]
        real = mask.bool()
        torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
        # inputs_embeds path is the same computation
        out_e = ours(inputs_embeds=ours.embed(ids), attention_mask=mask)["logits"]
        torch.testing.assert_close(out_e[real], out[real])


def test_rope_scaling_changes_frequencies():
    base = LLMConfig.from_name("tiny")
    lin = LLMConfig.from_name("tiny", rope_scaling=RopeScaling("linear", factor=4.0))
    l3 = LLMConfig.from_name("tiny", rope_theta=500000.0, rope_scaling=RopeScaling(
        "llama3", factor=8.0, original_max_position_embeddings=32))
    torch.testing.assert_close(rope_inv_freq(lin), rope_inv_freq(base) / 4)
    f0, f3 = rope_inv_freq(LLMConfig.from_name("tiny", rope_theta=500000.0)), rope_inv_freq(l3)
    assert f3[0] == f0[0] and torch.isclose(f3[-1], f0[-1] / 8)  # high freq kept, low freq scaled


def test_kv_cache_incremental_equals_full_forward(tmp_path):
    _, model = hf_tiny(tmp_path, num_key_value_heads=2)
    ids, mask = left_padded(T=10)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask)["logits"]
        cache = KVCache(model.config.n_layers)  # capacity 0: exercises growth too
        steps = []
        for a, b in [(0, 5), (5, 6), (6, 7), (7, 10)]:
            out = model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], cache=cache)
            steps.append(out["logits"])
        assert cache.length == 10
        real = mask.bool()
        torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=1e-5)
        # no mask at all: positions continue from the cache length
        full = model(input_ids=ids)["logits"]
        cache = KVCache(model.config.n_layers, capacity=16)
        first = model(input_ids=ids[:, :7], cache=cache)["logits"]
        rest = model(input_ids=ids[:, 7:], cache=cache)["logits"]
        torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-5)


def test_cache_reorder_selects_rows(tmp_path):
    _, model = hf_tiny(tmp_path)
    ids, _ = left_padded(pads=(0, 0, 0))
    with torch.no_grad():
        cache = KVCache(model.config.n_layers)
        model(input_ids=ids[:, :6], cache=cache)
        cache.reorder(torch.tensor([2, 0, 0]))
        out = model(input_ids=ids[[2, 0, 0], 6:], cache=cache)["logits"]
        ref = model(input_ids=ids[[2, 0, 0]])["logits"][:, 6:]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_attention_backends_agree(tmp_path):
    _, model = hf_tiny(tmp_path)
    ids, mask = left_padded()
    outs = {}
    with torch.no_grad():
        for backend in ("sdpa", "math"):
            for layer in model.model.layers:
                layer.self_attn.backend = backend
            outs[backend] = (model(input_ids=ids)["logits"],
                             model(input_ids=ids, attention_mask=mask)["logits"])
    for a, b in zip(outs["sdpa"], outs["math"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_frozen_llm_passes_gradient_to_soft_prompt():
    torch.manual_seed(0)
    model = LLaMA(LLMConfig.from_name("tiny", vocab_size=50))
    model.requires_grad_(False)
    soft = torch.randn(2, 4, model.config.dim, requires_grad=True)  # the projected Q-Former queries
    text = model.embed(torch.randint(0, 50, (2, 5)))
    logits = model(inputs_embeds=torch.cat([soft, text], 1))["logits"]
    logits.logsumexp(-1).mean().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_gradient_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    cfg = LLMConfig.from_name("tiny", vocab_size=50, tie_embeddings=False)
    plain = LLaMA(cfg)
    ckpt = LLaMA(LLMConfig.from_name("tiny", vocab_size=50, tie_embeddings=False,
                                     gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 6, cfg.dim)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    grads = []
    for m in (plain, ckpt):
        xi = x.clone().requires_grad_(True)
        out = m(inputs_embeds=xi, attention_mask=mask)["logits"]
        out.pow(2).mean().backward()
        grads.append((out.detach(), xi.grad, m.model.layers[0].mlp.up_proj.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_config_presets_and_hf_json():
    c = LLMConfig.from_name("llama3-8b")
    assert (c.kv_heads, c.head_size) == (8, 128)
    with pytest.raises(ValueError, match="unknown LLM preset"):
        LLMConfig.from_name("llama-9000")
    old = dict(model_type="llama", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
               num_attention_heads=32, intermediate_size=11008, rms_norm_eps=1e-6,
               max_position_embeddings=2048,
               rope_scaling={"type": "linear", "factor": 2.0})  # transformers-4 style, no num_key_value_heads
    c = LLMConfig.from_hf_json(old)
    assert c.kv_heads == 32 and c.rope_scaling.rope_type == "linear" and c.rope_scaling.factor == 2.0
    assert c.rope_theta == 10000.0
    with pytest.raises(ValueError, match="yarn"):
        LLMConfig.from_hf_json({**old, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="n_kv_heads"):
        LLMConfig(dim=64, n_heads=4, n_kv_heads=3)


def test_yaml_override_rederives_head_size():
    """Derived sizes must follow a config-file override of dim / n_heads, not keep the old values."""
    omegaconf = pytest.importorskip("omegaconf")
    small = LLMConfig(dim=64, n_heads=4, n_layers=1, vocab_size=10, hidden_dim=8)
    node = omegaconf.OmegaConf.structured(small)
    node = omegaconf.OmegaConf.merge(node, {"dim": 96, "n_heads": 8})
    cfg = omegaconf.OmegaConf.to_object(node)
    assert (cfg.head_size, cfg.kv_heads) == (12, 8)
    assert LLaMA(cfg).model.layers[0].self_attn.k_proj.weight.shape == (96, 96)


def test_forward_rejects_bad_inputs():
    model = LLaMA(LLMConfig.from_name("tiny", vocab_size=50))
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=model.embed(ids))
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="logits_at has shape"):
        model(input_ids=ids, logits_at=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at most one"):
        model(input_ids=ids, logits_at=torch.ones(2, 3, dtype=torch.bool), last_logits_only=True)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_at_selected_positions_equal_full_logits_and_their_gradients(tied):
    """Training losses ask for the answer positions only: same logits there, same input gradients."""
    torch.manual_seed(0)
    model = LLaMA(LLMConfig.from_name("tiny", vocab_size=50, tie_embeddings=tied)).requires_grad_(False)
    ids, mask = left_padded(pads=(2, 0, 4))
    ids = ids % 50
    where = torch.zeros(3, 9, dtype=torch.bool)
    where[0, 5:8] = where[2, 8] = True  # row 1: none
    grads = []
    for at in (None, where):
        soft = torch.randn(3, 9, model.config.dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
        logits = model(inputs_embeds=soft, attention_mask=mask, logits_at=at)["logits"]
        sel = logits if at is not None else logits[where]
        assert sel.shape == (4, 50)
        sel.logsumexp(-1).sum().backward()
        grads.append((sel.detach(), soft.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (4, 1), (2, 4), (8, 1), (3, 3), (16, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_decode_linear_is_f_linear(shape, with_bias):
    """models.llm.linear at weights below kernel_choice.MIN_WEIGHT: F.linear's values, contiguous, with or
    without autograd (every measured kernel is checked in tests/models/test_kernel_choice.py)."""
    from expvl.models.llm import linear

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, 48, generator=g), torch.randn(96, 48, generator=g)
    b = torch.randn(96, generator=g) if with_bias else None
    with torch.no_grad():
        out = linear(x, w, b)
    assert out.shape == (*shape, 96) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))  # autograd on: the plain path


def test_sliding_window_mask_truth_table():
    """Queries in cache slots 2..4 of 5, window 3: each sees itself and the two slots before it;
    a padded slot stays hidden."""
    from expvl.models.llm import _mask_bias

    bias, causal = _mask_bias(None, 3, 2, 3, torch.float32, "cpu")
    assert not causal
    assert (bias[0, 0] == 0).int().tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    bias, _ = _mask_bias(torch.tensor([[0, 1, 1, 1, 1]]), 3, 2, 3, torch.float32, "cpu")
    assert (bias[0, 0] == 0).int().tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    cfg = LLMConfig(vocab_size=20, dim=16, n_layers=3, n_heads=2, hidden_dim=8, sliding_window=4, max_window_layers=1)
    assert [cfg.uses_window(i) for i in range(3)] == [False, True, True]
    with pytest.raises(ValueError, match="sliding_window"):
        LLMConfig(sliding_window=0)
