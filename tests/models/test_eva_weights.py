"""EVA-layout ViT weights (LAVIS eva_vit_g.pth) -> our encoder: parity with transformers Blip2VisionModel.

The oracle: transformers' Blip2VisionModel is the port of LAVIS's EVA ViT, and its weights were
converted from LAVIS's `visual_encoder.*` names by `convert_blip_2_original_to_pytorch.py`
(`create_rename_keys`). `_lavis_names` below is that table read backwards, so a tiny random HF model
becomes a tiny "eva_vit_g.pth"; our encoder loads the file and must give the HF hidden states.
The tiny tower is timm's `Eva` (the class open_clip's EVA01-g-14 wraps) at test size, registered
with timm under a test name so it is built through open_clip like the real one (tests/helpers/eva.py).
"""

import pytest
import torch

from expvl.models.convert.eva import PREFIXES
from expvl.models.convert.weights import CheckpointError
from expvl.models.vision import VisionConfig, VisionEncoder
from tests.helpers.eva import EVA_CUSTOM, FFN, HEADS, HF_LAYERS, PATCH, SIZE, WIDTH

transformers = pytest.importorskip("transformers")


def _hf_model(seed=0):
    cfg = transformers.Blip2VisionConfig(hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=HF_LAYERS,
                                         num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH,
                                         layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)
    torch.manual_seed(seed)
    model = transformers.Blip2VisionModel(cfg).eval()
    with torch.no_grad():  # HF initialises biases and norms to constants: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for layer in model.encoder.layers:  # the k third of the fused qkv bias stays 0, as in LAVIS (no k bias)
            layer.self_attn.qkv.bias[WIDTH:2 * WIDTH] = 0
    return model


def _lavis_names(hf_state, prefix="visual_encoder."):
    """transformers' Blip2 vision keys -> LAVIS's (create_rename_keys, right to left); ln_vision is not the ViT's.

    transformers 5 keeps LAVIS's q_bias / v_bias as one fused qkv bias (k third 0): split back."""
    emb = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
           "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
           "embeddings.patch_embedding.bias": "patch_embed.proj.bias"}
    layer = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
             "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    out = {}
    for key, value in hf_state.items():
        if key in emb:
            out[prefix + emb[key]] = value
        elif key.endswith("self_attn.qkv.bias"):
            i = key.split(".")[2]
            out[f"{prefix}blocks.{i}.attn.q_bias"], _, out[f"{prefix}blocks.{i}.attn.v_bias"] = value.chunk(3)
        elif key.startswith("post_layernorm."):
            out["ln_vision." + key.split(".", 1)[1]] = value
        else:
            _, _, i, rest = key.split(".", 3)  # encoder.layers.{i}.<rest>
            theirs = next(k for k in layer if rest.startswith(k))
            out[f"{prefix}blocks.{i}.{layer[theirs]}{rest[len(theirs):]}"] = value
    return out


def _eva_file(tmp_path, hf, prefix, *, drop=(), extra=None):
    """A LAVIS-style file: the HF weights under `prefix`, plus one more block than the encoder reads
    (as the 40-block eva_vit_g.pth under BLIP-2's 39) and, for a whole model, a Q-Former key."""
    state = _lavis_names(hf.state_dict(), prefix)
    last = {k.replace(f"blocks.{HF_LAYERS - 1}.", f"blocks.{HF_LAYERS}."): torch.randn_like(v)
            for k, v in state.items() if f"blocks.{HF_LAYERS - 1}." in k}
    state |= last | (extra or {})
    if prefix == "":
        state = {k: v for k, v in state.items() if not k.startswith("ln_vision.")}
    else:
        state["Qformer.bert.embeddings.LayerNorm.weight"] = torch.ones(8)
    for k in drop:
        del state[k]
    path = tmp_path / "eva_vit_g.pth"
    torch.save(state, path)
    return str(path)


def _encoder(path, size=SIZE):
    return VisionEncoder(VisionConfig(custom=EVA_CUSTOM, image_size=size, layer=-2, pretrained=path))


@pytest.mark.parametrize("prefix", PREFIXES)
def test_eva_layout_file_gives_the_hf_blip2_vision_tokens(tmp_path, prefix):
    hf = _hf_model()
    enc = _encoder(_eva_file(tmp_path, hf, prefix))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ours = enc(x)
        theirs = hf(pixel_values=x, output_hidden_states=True).hidden_states[HF_LAYERS]  # before post_layernorm
    assert ours.shape == theirs.shape == (2, 1 + (SIZE // PATCH) ** 2, WIDTH)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_position_embedding_is_resized_as_lavis_and_hf_do(tmp_path):
    hf, size = _hf_model(), 3 * PATCH  # a 2 x 2 grid in the file, 3 x 3 in the encoder (LAVIS: 224 -> 364 px)
    enc = _encoder(_eva_file(tmp_path, hf, ""), size=size)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ours = enc(x)
        theirs = hf(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[HF_LAYERS]
    assert ours.shape == (1, 10, WIDTH)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_missing_block_weight_is_named(tmp_path):
    path = _eva_file(tmp_path, _hf_model(), "", drop=["blocks.1.attn.q_bias"])
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.q_bias"):
        _encoder(path)


def test_unknown_key_is_named(tmp_path):
    path = _eva_file(tmp_path, _hf_model(), "", extra={"blocks.0.attn.relative_position_bias_table": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="relative_position_bias_table"):
        _encoder(path)


def test_eva_file_into_another_tower_is_refused(tmp_path):
    path = _eva_file(tmp_path, _hf_model(), "")
    with pytest.raises(CheckpointError, match=r"eva_vit_g\.pth.*EVA01-g-14"):
        VisionEncoder(VisionConfig.from_name("tiny-vit", pretrained=path))


def test_real_eva_vit_g_names_and_shapes_fit_eva01_g_14_on_meta():
    """LAVIS create_eva_vit_g (224 px, 1408 wide, 16 heads, FFN int(1408 * 4.3637) = 6144, q/v biases)
    with eva_vit_g.pth's 40 blocks, as meta tensors, against our EVA01-g-14 encoder built on meta: every
    key the encoder keeps (39 blocks, BLIP-2's penultimate read-out) is there with its shape, and only
    the 40th block is left over (pruned, as LAVIS drops it)."""
    from expvl.models.convert.eva import eva_to_open_clip
    D, F = 1408, int(1408 * 4.3637)
    block = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.q_bias": (D,),
             "attn.v_bias": (D,), "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "norm2.weight": (D,),
             "norm2.bias": (D,), "mlp.fc1.weight": (F, D), "mlp.fc1.bias": (F,), "mlp.fc2.weight": (D, F),
             "mlp.fc2.bias": (D,)}
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 257, D), "patch_embed.proj.weight": (D, 3, 14, 14),
              "patch_embed.proj.bias": (D,)}
    shapes |= {f"blocks.{i}.{k}": s for i in range(40) for k, s in block.items()}
    enc = VisionEncoder(VisionConfig.from_name("eva-g"), device="meta")
    kept = {k: v.shape for k, v in enc.state_dict().items()}
    converted = eva_to_open_clip({k: torch.empty(s, device="meta") for k, s in shapes.items()}, enc.visual,
                                 prefix="", what="eva_vit_g.pth")
    assert {k: converted[k].shape for k in kept} == kept
    assert set(converted) - set(kept) == {f"visual.trunk.blocks.39.{k}" for k in block}


def test_legacy_pickle_format_loads(tmp_path):
    """A file saved before torch 1.6's zip format (which cannot be memory-mapped) reads all the same."""
    hf = _hf_model()
    path = _eva_file(tmp_path, hf, "")
    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(path), legacy, _use_new_zipfile_serialization=False)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(_encoder(str(legacy))(x), _encoder(path)(x))
