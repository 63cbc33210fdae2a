"""Q-Former converters: full-size LAVIS key layouts on `meta` tensors, round trips, and errors.

The LAVIS key names below are written out from salesforce/LAVIS lavis/models/blip2_models/
Qformer.py (BertEmbeddings, BertLayer with `crossattention` when layer_num % cross_attention_freq
== 0, `intermediate_query` / `output_query`, BertOnlyMLMHead as `cls.predictions`), blip2.py /
blip2_qformer.py (query_tokens, ln_vision, vision_proj, text_proj, itm_head, temp), blip2_opt.py
(text parts set to None, opt_proj) and blip2_vicuna_instruct.py (cls None, llm_proj) - not derived
from our model, so the test checks our naming against LAVIS's.
"""

import dataclasses

import pytest
import torch

from expvl.models.convert.hf_blip2 import (
    instructblip_key_map,
    load_hf_blip2_qformer,
    load_hf_instructblip_qformer,
)
from expvl.models.convert.lavis import lavis_key_map, load_lavis_qformer
from expvl.models.convert.weights import CheckpointError
from expvl.models.qformer import QFormer, QFormerConfig

D, W, F, V, Q, P, LAYERS = 768, 1408, 3072, 30523, 32, 512, 12


def _linear(name, out_f, in_f):
    return {f"{name}.weight": (out_f, in_f), f"{name}.bias": (out_f,)}


def _norm(name, width=D):
    return {f"{name}.weight": (width,), f"{name}.bias": (width,)}


def lavis_keys(*, text: bool, cls: bool) -> dict[str, tuple]:
    """LAVIS Qformer.* + query_tokens shapes for BLIP-2 (EVA ViT-g width 1408, bert-base + [DEC])."""
    keys = {"query_tokens": (1, Q, D), "Qformer.bert.embeddings.position_ids": (1, P)}
    keys |= _norm("Qformer.bert.embeddings.LayerNorm")
    if text:
        keys |= {"Qformer.bert.embeddings.word_embeddings.weight": (V, D),
                 "Qformer.bert.embeddings.position_embeddings.weight": (P, D)}
    for i in range(LAYERS):
        p = f"Qformer.bert.encoder.layer.{i}."
        blocks = [("attention", D)] + ([("crossattention", W)] if i % 2 == 0 else [])
        for block, kv_width in blocks:
            keys |= _linear(p + block + ".self.query", D, D)
            keys |= _linear(p + block + ".self.key", D, kv_width)
            keys |= _linear(p + block + ".self.value", D, kv_width)
            keys |= _linear(p + block + ".output.dense", D, D) | _norm(p + block + ".output.LayerNorm")
        ffns = ["_query"] + ([""] if text else [])
        for suffix in ffns:
            keys |= _linear(p + f"intermediate{suffix}.dense", F, D)
            keys |= _linear(p + f"output{suffix}.dense", D, F) | _norm(p + f"output{suffix}.LayerNorm")
    if cls:
        keys |= {"Qformer.cls.predictions.bias": (V,), "Qformer.cls.predictions.decoder.weight": (V, D),
                 "Qformer.cls.predictions.decoder.bias": (V,)}
        keys |= _linear("Qformer.cls.predictions.transform.dense", D, D)
        keys |= _norm("Qformer.cls.predictions.transform.LayerNorm")
    return keys


STAGE1_PARTS = (_norm("ln_vision", W) | _linear("vision_proj", 256, D) | _linear("text_proj", 256, D)
                | _linear("itm_head", 2, D) | {"temp": ()})
VIT = {"visual_encoder.cls_token": (1, 1, W), "visual_encoder.blocks.0.attn.qkv.weight": (3 * W, W)}


def _meta(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _meta_qformer(**overrides) -> QFormer:
    with torch.device("meta"):
        return QFormer(QFormerConfig.from_name("blip2", **overrides))


def test_full_size_stage1_checkpoint_on_meta():
    model = _meta_qformer()
    source = _meta(lavis_keys(text=True, cls=True) | STAGE1_PARTS | VIT)
    parts = load_lavis_qformer(model, source)  # strict: every model key filled, every source key placed
    assert set(parts) == set(STAGE1_PARTS)
    ours = model.state_dict()
    for key, theirs in lavis_key_map(model).items():
        assert ours[key].shape == source[theirs].shape, key


def test_full_size_parameter_count():
    """BLIP-2 paper: 188M for Q-Former + queries (with the tied LM head counted once)."""
    model = _meta_qformer()
    n = sum(p.numel() for p in model.parameters())  # .parameters() counts tied tensors once
    assert 185e6 < n < 190e6, n


def test_full_size_stage2_opt_checkpoint_on_meta():
    """blip2_opt: LAVIS deleted the text parts; opt_proj and the OPT weights sit beside them."""
    model = _meta_qformer(text_input=False, lm_head=False)
    source = _meta(lavis_keys(text=False, cls=False) | _norm("ln_vision", W) | _linear("opt_proj", 2560, D)
                   | VIT | {"opt_model.model.decoder.embed_tokens.weight": (50272, 2560)})
    assert set(load_lavis_qformer(model, source)) == {"ln_vision.weight", "ln_vision.bias",
                                                       "opt_proj.weight", "opt_proj.bias"}


def test_stage1_checkpoint_initialises_the_query_only_model():
    """BLIP-2 stage 2 starts from blip2_pretrained.pth: its text parts are skipped by exact name."""
    model = _meta_qformer(text_input=False, lm_head=False)
    assert set(load_lavis_qformer(model, _meta(lavis_keys(text=True, cls=True) | STAGE1_PARTS))) == set(STAGE1_PARTS)


def test_full_size_instructblip_checkpoint_on_meta():
    model = _meta_qformer(lm_head=False)
    source = _meta(lavis_keys(text=True, cls=False) | _norm("ln_vision", W) | _linear("llm_proj", 4096, D)
                   | {"llm_model.model.embed_tokens.weight": (32001, 4096)})
    assert set(load_lavis_qformer(model, source)) == {"ln_vision.weight", "ln_vision.bias",
                                                       "llm_proj.weight", "llm_proj.bias"}


def test_full_size_hf_instructblip_map_on_meta():
    model = _meta_qformer(lm_head=False)
    ours = model.state_dict()
    source = {theirs: torch.empty(ours[key].shape, device="meta")
              for key, theirs in instructblip_key_map(model.cfg).items()}
    assert "qformer.encoder.layer.10.crossattention.attention.key.weight" in source
    assert source["qformer.encoder.layer.10.crossattention.attention.key.weight"].shape == (D, W)
    assert "qformer.encoder.layer.11.crossattention.attention.key.weight" not in source
    load_hf_instructblip_qformer(model, source)


# ---- round trip and errors on a tiny model ---------------------------------------------------------

TINY = QFormerConfig.from_name("tiny", attention_backend="math")


def _tiny_lavis_checkpoint(model: QFormer) -> dict[str, torch.Tensor]:
    ours = model.state_dict()
    state = {theirs: ours[key].clone() for key, theirs in lavis_key_map(model).items()}
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(TINY.max_position_embeddings)[None]
    state["Qformer.cls.predictions.decoder.bias"] = state["Qformer.cls.predictions.bias"]
    return state | {"temp": torch.tensor(0.07), "visual_encoder.cls_token": torch.zeros(1, 1, 48)}


def test_round_trip_through_a_file(tmp_path):
    source = QFormer(TINY).eval()
    path = tmp_path / "blip2_tiny.pth"
    torch.save({"model": _tiny_lavis_checkpoint(source)}, path)
    target = QFormer(TINY).eval()
    assert set(load_lavis_qformer(target, path)) == {"temp"}
    image = torch.randn(2, 3, TINY.encoder_width)
    assert torch.equal(target.encode_queries(image)["hidden"], source.encode_queries(image)["hidden"])
    assert target.cls.predictions.decoder.weight is target.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("Qformer.bert.encoder.layer.1.output_query.dense.weight"),
     r"missing key\(s\) \['Qformer.bert.encoder.layer.1.output_query.dense.weight'\]"),
    (lambda s: s.update({"Qformer.bert.encoder.layer.0.attention.self.distance_embedding.weight":
                         torch.zeros(3)}), "unexpected key.*distance_embedding"),
    (lambda s: s.update({"t5_proj.weight": torch.zeros(3)}), r"unexpected key\(s\) \['t5_proj.weight'\]"),
    (lambda s: s.update({"Qformer.bert.encoder.layer.0.crossattention.self.key.weight": torch.zeros(32, 40)}),
     r"crossattention.self.key.weight has shape \(32, 40\).*wants \(32, 48\)"),
    (lambda s: s.update({"Qformer.cls.predictions.decoder.weight": torch.zeros(512, 32)}),
     "decoder.weight differs from the word embeddings"),
])
def test_bad_checkpoints_name_the_key(edit, message):
    state = _tiny_lavis_checkpoint(QFormer(TINY))
    edit(state)
    with pytest.raises(CheckpointError, match=message):
        load_lavis_qformer(QFormer(TINY), state)


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model": _tiny_lavis_checkpoint(QFormer(TINY))}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_lavis_qformer(QFormer(TINY), path)


def test_stage2_checkpoint_into_a_text_model_is_refused():
    query_only = QFormer(dataclasses.replace(TINY, text_input=False, lm_head=False))
    state = {lavis_key_map(query_only)[k]: v for k, v in query_only.state_dict().items()}
    with pytest.raises(CheckpointError, match="text_input=False"):
        load_lavis_qformer(QFormer(TINY), state)


def test_hf_loaders_refuse_an_lm_head_and_missing_keys():
    with pytest.raises(CheckpointError, match="lm_head=False"):
        load_hf_blip2_qformer(QFormer(TINY), {})
    model = QFormer(dataclasses.replace(TINY, lm_head=False))
    ours = model.state_dict()
    state = {theirs: ours[key] for key, theirs in instructblip_key_map(TINY).items()}
    del state["qformer.encoder.layer.0.crossattention.attention.value.bias"]
    with pytest.raises(CheckpointError, match="crossattention.attention.value.bias"):
        load_hf_instructblip_qformer(model, state)
