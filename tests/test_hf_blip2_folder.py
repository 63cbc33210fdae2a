"""A transformers InstructBlip / Blip2 folder as the starting point of a stage (`mode=stage`).

The oracle is transformers itself: a tiny random `InstructBlipForConditionalGeneration` (or
`Blip2ForConditionalGeneration`) with a LLaMA language model is saved with `save_pretrained`; our
encoder (`model.vision.pretrained`), LLM (`pretrained.llm`) and Q-Former with its parts
(`pretrained.hf_checkpoint`) all read that one folder, and must give transformers' soft prompt
(`get_image_features`) and the LLM's logits after it. Folders saved by transformers 4 (the hub's
InstructBLIP / BLIP-2 files: separate q/v biases in the ViT, shards) are written out from the same model.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from configs.schema import PretrainedConfig, RunConfig
from models.blip2 import Blip2, Blip2Config
from models.convert import CheckpointError
from models.convert.llama import load_hf_llama
from models.qformer import QFormerConfig
from models.vision import VisionConfig, VisionEncoder
from single_stage import init_stage_weights
from tests.test_eva_weights import FFN, HEADS, HF_LAYERS, PATCH, SIZE, WIDTH

transformers = pytest.importorskip("transformers")

Q, QF_VOCAB, QF_WIDTH = 4, 100, 32
VISION = {"hidden_size": WIDTH, "intermediate_size": FFN, "num_hidden_layers": HF_LAYERS,
          "num_attention_heads": HEADS, "image_size": SIZE, "patch_size": PATCH, "layer_norm_eps": 1e-6,
          "hidden_act": "gelu", "qkv_bias": True}
QFORMER = {"hidden_size": QF_WIDTH, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
           "encoder_hidden_size": WIDTH, "vocab_size": QF_VOCAB, "max_position_embeddings": 64}
TEXT = {"model_type": "llama", "vocab_size": 120, "hidden_size": 48, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False}


def _hf(kind: str, seed=0):
    family = {"instructblip": (transformers.InstructBlipConfig,
                               transformers.InstructBlipForConditionalGeneration),
              "blip2": (transformers.Blip2Config, transformers.Blip2ForConditionalGeneration)}
    config_cls, model_cls = family[kind]
    cfg = config_cls(vision_config=VISION, qformer_config=QFORMER, text_config=TEXT, num_query_tokens=Q)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # HF initialises biases and norms to constants: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for layer in model.vision_model.encoder.layers:  # EVA has no key bias: the k third stays 0
            layer.self_attn.qkv.bias[WIDTH:2 * WIDTH] = 0
    return model


def _as_transformers_4(folder):
    """Rewrite a saved folder as transformers 4 saved the hub checkpoints: q_bias / v_bias instead of the
    fused qkv bias, and two shards with an index."""
    state = load_file(folder / "model.safetensors")
    for key in [k for k in state if k.endswith("self_attn.qkv.bias")]:
        q, _, v = state.pop(key).chunk(3)
        state[key.replace("qkv.bias", "q_bias")], state[key.replace("qkv.bias", "v_bias")] = q, v
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k].contiguous() for k in part}, folder / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _folder(tmp_path, kind="instructblip", layout="transformers 5"):
    hf = _hf(kind)
    folder = tmp_path / kind
    hf.save_pretrained(folder)
    if layout == "transformers 4":
        _as_transformers_4(folder)
    return hf, folder


def _ours(folder, stage="instruct"):
    """Our Blip2 as `mode=stage` builds it from the folder, then `pretrained.hf_checkpoint` applied."""
    custom = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "_test_eva_tiny", "timm_pool": "token",
                                              "timm_proj": "linear"},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    vision = VisionEncoder(VisionConfig(custom=custom, image_size=SIZE, layer=-2, pretrained=str(folder)))
    llm = load_hf_llama(folder).eval()
    qformer = QFormerConfig(vocab_size=QF_VOCAB, hidden_size=QF_WIDTH, num_layers=2, num_heads=4, intermediate_size=64,
                            max_position_embeddings=64, encoder_width=WIDTH, num_query_tokens=Q)
    model = Blip2(Blip2Config(stage=stage, qformer=qformer, llm=llm.config), vision=vision, llm=llm).eval()
    init_stage_weights(model, PretrainedConfig(hf_checkpoint=str(folder)))
    return model


@pytest.mark.parametrize("layout", ["transformers 5", "transformers 4"])
def test_instructblip_folder_gives_transformers_soft_prompt_and_logits(tmp_path, layout):
    hf, folder = _folder(tmp_path, layout=layout)
    ours = _ours(folder)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=g)
    instruction = torch.randint(1, QF_VOCAB, (2, 6), generator=g)
    text = torch.randint(3, 120, (2, 5), generator=g)
    with torch.no_grad():
        theirs = hf.get_image_features(pixel_values=pixels, qformer_input_ids=instruction).pooler_output
        prompt = ours.soft_prompt(ours.encode_image(pixels), instruction, torch.ones_like(instruction))
        torch.testing.assert_close(prompt, theirs, rtol=1e-4, atol=1e-5)
        embeds = torch.cat([theirs, hf.get_input_embeddings()(text)], 1)
        hf_logits = hf.language_model(inputs_embeds=embeds).logits
        our_logits = ours.llm(inputs_embeds=torch.cat([prompt, ours.llm.embed(text)], 1))["logits"]
    assert our_logits.shape == (2, Q + 5, 120)
    torch.testing.assert_close(our_logits, hf_logits, rtol=1e-4, atol=1e-4)


def test_blip2_folder_into_the_query_only_caption_stage(tmp_path):
    hf, folder = _folder(tmp_path, kind="blip2")
    ours = _ours(folder, stage="caption")
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(ours.soft_prompt(ours.encode_image(pixels)), theirs, rtol=1e-4, atol=1e-5)


def test_a_key_bias_in_the_vision_tower_is_refused(tmp_path):
    hf = _hf("instructblip")
    with torch.no_grad():
        hf.vision_model.encoder.layers[1].self_attn.qkv.bias[WIDTH] = 0.5
    hf.save_pretrained(tmp_path / "f")
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.qkv\.bias has a non-zero key bias"):
        _ours(tmp_path / "f")


def test_unknown_vision_key_and_missing_qformer_key_are_named(tmp_path):
    _, folder = _folder(tmp_path)
    state = load_file(folder / "model.safetensors")
    extra = "vision_model.encoder.layers.0.self_attn.rel_pos"
    save_file(state | {extra: torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected vision key " + extra.replace(".", r"\.")):
        _ours(folder)
    del state["qformer.encoder.layer.1.output_query.dense.bias"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"qformer\.encoder\.layer\.1\.output_query\.dense\.bias"):
        _ours(folder)


def test_a_folder_without_a_vision_model_is_refused_as_encoder_weights(tmp_path):
    _, folder = _folder(tmp_path)
    state = load_file(folder / "model.safetensors")
    no_vision = {k: v for k, v in state.items() if not k.startswith("vision_model.")}
    save_file(no_vision, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="has none"):
        _ours(folder)


def test_real_instructblip_vision_names_and_shapes_fit_eva01_g_14_on_meta():
    """transformers' default Blip2VisionConfig is BLIP-2's ViT-g (39 blocks, 1408 wide, FFN 6144): its
    `vision_model.*` on meta, converted, is exactly what our EVA01-g-14 encoder keeps."""
    from models.convert.eva import eva_to_open_clip, hf_vision_to_eva

    with torch.device("meta"):
        hf = transformers.Blip2VisionModel(transformers.Blip2VisionConfig())
    state = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}
    enc = VisionEncoder(VisionConfig.from_name("eva-g"), device="meta")
    kept = {k: v.shape for k, v in enc.state_dict().items()}
    converted = eva_to_open_clip(hf_vision_to_eva(state, what="hf"), enc.visual, prefix="", what="hf")
    assert {k: v.shape for k, v in converted.items()} == kept


def test_lavis_and_hf_checkpoints_together_are_a_config_error():
    from configs import load_config

    with pytest.raises(ValueError, match="lavis_checkpoint and pretrained.hf_checkpoint"):
        load_config(RunConfig, ["tiny"], ["mode=stage", "stage=pretrain", "data.root=/d",
                                          "pretrained.qformer_vocab=/v", "pretrained.lavis_checkpoint=/a.pth",
                                          "pretrained.hf_checkpoint=/b"])
