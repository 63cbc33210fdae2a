"""The Q-Former: parity with transformers' Blip2 / InstructBlip Q-Formers, and its invariants.

transformers is the numerical oracle only: tiny random reference models, our converters, then
`assert_close` in eval mode (reference §1, §4).
"""

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from expvl.models.convert.hf_blip2 import load_hf_blip2_qformer, load_hf_instructblip_qformer
from expvl.models.qformer import QFormer, QFormerConfig
from expvl.models.qformer_masks import multimodal_causal_mask, unimodal_mask

CFG = QFormerConfig.from_name("tiny", attention_backend="math", num_layers=3)  # layers 0, 2 cross-attend
B, N, T = 2, 5, 6


def _inputs(cfg=CFG, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, N, cfg.encoder_width, generator=g)
    ids = torch.randint(1, cfg.vocab_size, (B, T), generator=g)
    text_mask = torch.ones(B, T, dtype=torch.long)
    text_mask[1, 4:] = 0  # right padding in the second sample
    ids[1, 4:] = cfg.pad_token_id
    return image, ids, text_mask


def _perturb(module, seed=2):
    """Random values everywhere, LayerNorms and biases included, so no weight hides behind an init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


# ---- parity with transformers ---------------------------------------------------------------------

def _hf_qformer_kwargs(cfg):
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
            "max_position_embeddings": cfg.max_position_embeddings, "encoder_hidden_size": cfg.encoder_width,
            "cross_attention_frequency": cfg.cross_attention_freq, "layer_norm_eps": cfg.layer_norm_eps,
            "pad_token_id": cfg.pad_token_id, "attn_implementation": "eager"}


@pytest.mark.parametrize("impl", ["project", "absorb"])  # the two CrossAttention implementations
def test_parity_hf_blip2_query_path(impl):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    hf = _perturb(Blip2QFormerModel(Blip2QFormerConfig(**_hf_qformer_kwargs(CFG)))).eval()
    query_tokens = torch.randn(1, CFG.num_query_tokens, CFG.hidden_size)
    state = {"qformer." + k: v for k, v in hf.state_dict().items()} | {"query_tokens": query_tokens}
    ours = QFormer(dataclasses.replace(CFG, text_input=False, lm_head=False, cross_attention_impl=impl)).eval()
    assert load_hf_blip2_qformer(ours, state) == {}

    image, _, _ = _inputs()
    image_mask = torch.ones(B, N, dtype=torch.long)
    image_mask[0, 3:] = 0  # the cross-attention mask must be honoured too
    with torch.no_grad():
        want = hf(query_embeds=query_tokens.expand(B, -1, -1), encoder_hidden_states=image,
                  encoder_attention_mask=image_mask).last_hidden_state
        got = ours.encode_queries(image, image_mask)["hidden"]
    assert got.shape == (B, CFG.num_query_tokens, CFG.hidden_size)
    assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_parity_hf_blip2_text_and_itm_paths():
    """Blip2ForImageTextRetrieval's layout: top-level `embeddings.*` + `qformer.*` with text FFN."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings
    hf_cfg = Blip2QFormerConfig(**_hf_qformer_kwargs(CFG), use_qformer_text_input=True)
    hf, emb = _perturb(Blip2QFormerModel(hf_cfg)).eval(), _perturb(Blip2TextEmbeddings(hf_cfg), 3).eval()
    query_tokens = torch.randn(1, CFG.num_query_tokens, CFG.hidden_size)
    state = ({"qformer." + k: v for k, v in hf.state_dict().items()} | {"query_tokens": query_tokens}
             | {"embeddings." + k: v for k, v in emb.state_dict().items()}
             | {"itm_head.weight": torch.zeros(2, CFG.hidden_size)})
    ours = QFormer(dataclasses.replace(CFG, lm_head=False)).eval()
    parts = load_hf_blip2_qformer(ours, state)
    assert list(parts) == ["itm_head.weight"]

    image, ids, text_mask = _inputs()
    Q = CFG.num_query_tokens
    with torch.no_grad():
        want_text = hf(query_embeds=emb(input_ids=ids), query_length=0,
                       attention_mask=text_mask).last_hidden_state
        want_itm = hf(query_embeds=emb(input_ids=ids, query_embeds=query_tokens.expand(B, -1, -1)),
                      query_length=Q, attention_mask=torch.cat([torch.ones(B, Q, dtype=torch.long), text_mask], 1),
                      encoder_hidden_states=image).last_hidden_state
        got_text = ours.encode_text(ids, text_mask)["hidden"]
        got_itm = ours.encode_multimodal(ids, text_mask, image)
    assert_close(got_text, want_text, atol=1e-5, rtol=1e-5)
    assert_close(got_itm["query_hidden"], want_itm[:, :Q], atol=1e-5, rtol=1e-5)
    assert_close(got_itm["text_hidden"], want_itm[:, Q:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["project", "absorb"])
def test_parity_hf_instructblip(impl):
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel
    hf = _perturb(InstructBlipQFormerModel(InstructBlipQFormerConfig(**_hf_qformer_kwargs(CFG)))).eval()
    query_tokens = torch.randn(1, CFG.num_query_tokens, CFG.hidden_size)
    state = ({"qformer." + k: v for k, v in hf.state_dict().items()} | {"query_tokens": query_tokens}
             | {"language_projection.weight": torch.zeros(8, CFG.hidden_size),
                "vision_model.embeddings.class_embedding": torch.zeros(1, 1, CFG.encoder_width)})
    ours = QFormer(dataclasses.replace(CFG, lm_head=False, cross_attention_impl=impl)).eval()
    assert list(load_hf_instructblip_qformer(ours, state)) == ["language_projection.weight"]

    image, ids, text_mask = _inputs()
    Q = CFG.num_query_tokens
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=torch.cat([torch.ones(B, Q, dtype=torch.long), text_mask], 1),
                  query_embeds=query_tokens.expand(B, -1, -1), encoder_hidden_states=image,
                  encoder_attention_mask=torch.ones(B, N, dtype=torch.long)).last_hidden_state
        got = ours.encode_multimodal(ids, text_mask, image)
    assert_close(got["query_hidden"], want[:, :Q], atol=1e-5, rtol=1e-5)
    assert_close(got["text_hidden"], want[:, Q:], atol=1e-5, rtol=1e-5)


# ---- the two cross-attention implementations ------------------------------------------------------

def test_absorbed_cross_attention_equals_projection_in_values_and_gradients():
    """Train mode with attention dropout (math backend: both draw the same (B, H, Q, N) mask from the
    same RNG state), a padded image mask, one fully masked image: outputs and every gradient agree."""
    cfg = dataclasses.replace(CFG, hidden_dropout=0.0, attention_dropout=0.3)
    models = {}
    for impl in ("project", "absorb"):
        torch.manual_seed(0)
        models[impl] = _perturb(QFormer(dataclasses.replace(cfg, cross_attention_impl=impl))).train()
    image, ids, text_mask = _inputs(cfg)
    image_mask = torch.ones(B, N, dtype=torch.long)
    image_mask[0, 2:] = 0
    image_mask[1] = 0  # a row with no visible key attends uniformly in both
    got = {}
    for impl, qf in models.items():
        img = image.clone().requires_grad_(True)
        torch.manual_seed(5)
        out = qf.encode_multimodal(ids, text_mask, img, image_mask)
        loss = out["query_hidden"].square().sum() + out["text_hidden"].sum()
        grads = torch.autograd.grad(loss, [img, *qf.parameters()], allow_unused=True)
        got[impl] = (out["query_hidden"], grads)
    assert_close(got["absorb"][0], got["project"][0], atol=1e-5, rtol=1e-5)
    names = ["image"] + [n for n, _ in models["project"].named_parameters()]
    for name, a, b in zip(names, got["absorb"][1], got["project"][1], strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    # the dropout really fired (else the equality above says nothing about it)
    models["project"].eval()
    with torch.no_grad():
        clean = models["project"].encode_multimodal(ids, text_mask, image, image_mask)["query_hidden"]
    assert not torch.allclose(clean, got["project"][0], atol=1e-3)


def test_absorbed_attention_backward_passes_gradcheck():
    """The hand-written backward (models/absorbed_attention.py) against finite differences in float64:
    every input, the image included, under an additive mask with one hidden key and one row hidden
    entirely (a constant shift of the row, which softmax ignores)."""
    from expvl.models.absorbed_attention import AbsorbedCrossAttention
    g = torch.Generator().manual_seed(0)
    Bq, Tq, H, hd, E, Nk = 2, 3, 2, 4, 5, 6
    D = H * hd

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    bias = torch.zeros(Bq, 1, 1, Nk, dtype=torch.float64)
    bias[0, ..., 2] = -1e4  # finite: with finfo.min a fully hidden row's scores round to one constant,
    bias[1] = -1e4  # so finite differences see a flat function where the analytic softmax is not flat
    inputs = (rand(Bq, Tq, D), rand(Bq, Nk, E), rand(D, E), rand(D), rand(D, E), rand(D), bias, H, 0.5, 0.0)
    assert torch.autograd.gradcheck(AbsorbedCrossAttention.apply, inputs)
    inputs[1].requires_grad_(False)  # frozen image, as in BLIP-2: the backward skips its gradient
    q_only = torch.autograd.grad(AbsorbedCrossAttention.apply(*inputs).sum(), inputs[0])[0]
    inputs[1].requires_grad_(True)
    assert_close(q_only, torch.autograd.grad(AbsorbedCrossAttention.apply(*inputs).sum(), inputs[0])[0])


def test_absorbed_cross_attention_under_bf16_autocast():
    """Mixed precision (what bf16 GPU runs use; CPU autocast here): same function as the projection
    at bf16 tolerance, and gradients arrive in the parameters' fp32."""
    cfg = dataclasses.replace(CFG, text_input=False, lm_head=False)
    image = _inputs(cfg)[0]
    out, grads = {}, {}
    for impl in ("project", "absorb"):
        torch.manual_seed(0)
        qf = _perturb(QFormer(dataclasses.replace(cfg, cross_attention_impl=impl))).eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = qf.encode_queries(image)["hidden"]
        hidden.float().square().sum().backward()
        key = qf.layers[0].crossattention.self.key.weight
        out[impl], grads[impl] = hidden.float(), key.grad
        assert key.grad.dtype == torch.float32
    assert_close(out["absorb"], out["project"], atol=0.1, rtol=0.05)
    assert_close(grads["absorb"], grads["project"], atol=0.5, rtol=0.1)


def test_auto_cross_attention_picks_by_flops():
    blip2 = QFormer(QFormerConfig.from_name("blip2", text_input=False, lm_head=False, num_layers=1))
    assert blip2.layers[0].crossattention.use_absorb(32, 257)  # 0.63x the projection's FLOPs
    assert not blip2.layers[0].crossattention.use_absorb(32, 16)  # few image tokens: project
    from expvl.configs.schema import ModelConfig
    default = QFormer(dataclasses.replace(ModelConfig().qformer, num_heads=8))  # configs/default.yaml
    assert not default.layers[0].crossattention.use_absorb(8, 16)  # 0.97x: under the 3/4 margin
    forced = QFormer(dataclasses.replace(CFG, cross_attention_impl="absorb"))
    assert forced.layers[0].crossattention.use_absorb(8, 16)
    with pytest.raises(ValueError, match="cross_attention_impl 'fused'"):
        dataclasses.replace(CFG, cross_attention_impl="fused")


# ---- invariants -----------------------------------------------------------------------------------

@pytest.fixture
def model():
    return _perturb(QFormer(CFG)).eval()


def test_itg_decode_with_cached_queries_equals_full_forward(model):
    """LAVIS's ITG (query pass with use_cache, then text on past_key_values) is one pass with the
    multimodal causal mask: same query outputs, same logits; token-by-token decoding agrees too."""
    image, ids, text_mask = _inputs()
    Q = CFG.num_query_tokens
    with torch.no_grad():
        full = model(mask=multimodal_causal_mask(Q, text_mask), input_ids=ids, image_embeds=image)
        queries = model.encode_queries(image, use_cache=True)
        decoded = model.decode_text(ids, text_mask, queries["cache"])
        assert_close(queries["hidden"], full["query_hidden"], atol=1e-5, rtol=1e-5)
        assert_close(decoded["logits"], model.lm_logits(full["text_hidden"]), atol=1e-5, rtol=1e-5)
        assert decoded["logits"].shape == (B, T, CFG.vocab_size)

        cache, steps = queries["cache"], []
        for t in range(T):  # incremental generation: one new token at a time, cache growing
            step = model.decode_text(ids[:, t:t + 1], text_mask[:, :t + 1], cache)
            cache = step["cache"]
            steps.append(step["logits"])
        assert cache.text_len == T
    assert_close(torch.cat(steps, 1), decoded["logits"], atol=1e-5, rtol=1e-5)


def test_text_does_not_leak_into_itg_queries(model):
    """Under the multimodal causal mask, changing the text cannot change the query outputs, and
    changing a later token cannot change the logits of an earlier one."""
    image, ids, text_mask = _inputs()
    other = ids.clone()
    other[:, 3] = (other[:, 3] + 7) % CFG.vocab_size
    mask = multimodal_causal_mask(CFG.num_query_tokens, text_mask)
    with torch.no_grad():
        a, b = model(mask=mask, input_ids=ids, image_embeds=image), model(mask=mask, input_ids=other, image_embeds=image)
    assert_close(a["query_hidden"], b["query_hidden"])
    assert_close(a["text_hidden"][:, :3], b["text_hidden"][:, :3])
    assert not torch.allclose(a["text_hidden"][:, 3:], b["text_hidden"][:, 3:])


def test_unimodal_joint_pass_equals_the_two_itc_passes(model):
    image, ids, text_mask = _inputs()
    with torch.no_grad():
        joint = model(mask=unimodal_mask(CFG.num_query_tokens, text_mask), input_ids=ids, image_embeds=image)
        assert_close(joint["query_hidden"], model.encode_queries(image)["hidden"], atol=1e-5, rtol=1e-5)
        assert_close(joint["text_hidden"], model.encode_text(ids, text_mask)["hidden"], atol=1e-5, rtol=1e-5)


def test_padding_content_is_invisible(model):
    image, ids, text_mask = _inputs()
    other = ids.clone()
    other[1, 4:] = 5  # different tokens under the padding
    with torch.no_grad():
        a = model.encode_multimodal(ids, text_mask, image)
        b = model.encode_multimodal(other, text_mask, image)
    assert_close(a["query_hidden"], b["query_hidden"])
    assert_close(a["text_hidden"][1, :4], b["text_hidden"][1, :4])


def test_query_only_mode_has_no_text_parts_and_same_query_outputs(model):
    query_only = QFormer(dataclasses.replace(CFG, text_input=False, lm_head=False)).eval()
    names = set(query_only.state_dict())
    text_parts = {k for k in model.state_dict() if "word_embeddings" in k or "position_embeddings" in k
                  or ".intermediate." in k or ".output.dense" in k and "attention" not in k
                  or ".output.LayerNorm" in k and "attention" not in k or k.startswith("cls.")}
    assert text_parts and not names & text_parts  # the text parts exist in the full model only
    assert names | text_parts == set(model.state_dict())
    query_only.load_state_dict({k: v for k, v in model.state_dict().items() if k in names})

    image, ids, text_mask = _inputs()
    with torch.no_grad():
        assert_close(query_only.encode_queries(image)["hidden"], model.encode_queries(image)["hidden"])
    with pytest.raises(ValueError, match="text_input=False"):
        query_only.encode_text(ids, text_mask)


def test_gradients_reach_exactly_the_parts_each_phase_uses():
    model = QFormer(CFG).train()
    image, ids, text_mask = _inputs()
    weights = torch.randn(CFG.hidden_size)  # not .sum(): a LayerNorm output's sum has no gradient
    (model.encode_queries(image)["hidden"] @ weights).sum().backward()
    got = {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "query_tokens" in got and "bert.encoder.layer.0.crossattention.self.key.weight" in got
    assert "bert.encoder.layer.2.output_query.dense.weight" in got
    assert not {k for k in got if "word_embeddings" in k or ".intermediate." in k or k.startswith("cls.")}

    model.zero_grad(set_to_none=True)
    (model.encode_text(ids, text_mask)["hidden"] @ weights).sum().backward()
    got = {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "bert.embeddings.word_embeddings.weight" in got and "bert.encoder.layer.1.intermediate.dense.weight" in got
    assert not {k for k in got if "crossattention" in k or "_query" in k or k == "query_tokens"}


def test_lm_decoder_is_tied_to_word_embeddings(model):
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias


def test_config_presets_and_validation():
    blip2 = QFormerConfig.from_name("blip2")
    assert (blip2.vocab_size, blip2.hidden_size, blip2.num_layers, blip2.encoder_width,
            blip2.num_query_tokens, blip2.cross_attention_freq) == (30523, 768, 12, 1408, 32, 2)
    with pytest.raises(ValueError, match="unknown Q-Former preset"):
        QFormerConfig.from_name("blip3")
    with pytest.raises(ValueError, match="lm_head=True needs text_input=True"):
        QFormerConfig(text_input=False)
