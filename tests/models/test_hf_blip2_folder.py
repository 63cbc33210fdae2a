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
from PIL import Image
from safetensors.torch import load_file, save_file

from expvl.configs.schema import PretrainedConfig, RunConfig
from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.convert.llama import load_hf_llama
from expvl.models.convert.weights import CheckpointError
from expvl.models.qformer import QFormerConfig
from expvl.models.vision import VisionConfig, VisionEncoder
from expvl.training.single_stage import init_stage_weights
from tests.helpers.eva import EVA_CUSTOM, FFN, HEADS, HF_LAYERS, PATCH, SIZE, WIDTH
from tests.helpers.stage_parts import parts  # noqa: F401 -- synthesized data and tokenizers (module fixture)

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
    vision = VisionEncoder(VisionConfig(custom=EVA_CUSTOM, image_size=SIZE, layer=-2, pretrained=str(folder)))
    llm = load_hf_llama(folder).eval()
    qformer = QFormerConfig(vocab_size=QF_VOCAB, hidden_size=QF_WIDTH, num_layers=2, num_heads=4,
                            intermediate_size=64, max_position_embeddings=64, encoder_width=WIDTH,
                            num_query_tokens=Q)
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
    from expvl.models.convert.eva import eva_to_open_clip, hf_vision_to_eva

    with torch.device("meta"):
        hf = transformers.Blip2VisionModel(transformers.Blip2VisionConfig())
    state = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}
    enc = VisionEncoder(VisionConfig.from_name("eva-g"), device="meta")
    kept = {k: v.shape for k, v in enc.state_dict().items()}
    converted = eva_to_open_clip(hf_vision_to_eva(state, what="hf"), enc.visual, prefix="", what="hf")
    assert {k: v.shape for k, v in converted.items()} == kept


def test_lavis_and_hf_checkpoints_together_are_a_config_error():
    from expvl.configs import load_config

    with pytest.raises(ValueError, match="lavis_checkpoint and pretrained.hf_checkpoint"):
        load_config(RunConfig, ["tiny"], ["mode=stage", "stage=pretrain", "data.root=/d",
                                          "pretrained.qformer_vocab=/v", "pretrained.lavis_checkpoint=/a.pth",
                                          "pretrained.hf_checkpoint=/b"])


# ---- end to end: train.py mode=stage from the folder --------------------------------------------------


@pytest.mark.slow
def test_train_py_stage3_starts_from_the_folder(parts, tmp_path):  # noqa: F811
    """`train.py mode=stage stage=instruct` with the encoder, the LLM and the Q-Former all named by one
    InstructBlip folder: at lr 1e-12 the trained Q-Former, ln_vision and llm_proj are still transformers'."""
    from expvl.models.tokenizer import QFormerTokenizer
    from train import main

    qf_vocab = QFormerTokenizer.from_bert_vocab(parts["vocab"]).vocab_size
    cfg = transformers.InstructBlipConfig(
        vision_config=VISION, num_query_tokens=Q,
        qformer_config=QFORMER | {"vocab_size": qf_vocab, "max_position_embeddings": 256, "hidden_size": 64,
                                  "intermediate_size": 128, "cross_attention_frequency": 1},
        text_config=TEXT | {"vocab_size": parts["llm_vocab"]})
    torch.manual_seed(0)
    hf = transformers.InstructBlipForConditionalGeneration(cfg)
    with torch.no_grad():
        for layer in hf.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[WIDTH:2 * WIDTH] = 0
    folder = tmp_path / "instructblip"
    hf.save_pretrained(folder)
    vision = tmp_path / "vision.yaml"  # the tiny EVA tower of tests/helpers/eva.py, weights from the folder
    vision.write_text(json.dumps({"model": {"vision": {
        "custom": EVA_CUSTOM, "image_size": SIZE, "layer": -2, "transform": "blip2", "pretrained": str(folder)}}}))
    no_conv = tmp_path / "no_conv.yaml"  # drop the tiny config's conv tower first, so the dicts do not merge
    no_conv.write_text(json.dumps({"model": {"vision": {"custom": None}}}))
    frozen = [f"stage3.optim.{k}=1e-12" for k in ("lr", "warmup_lr", "min_lr")]
    out = main(["--config", "tiny", "--config", str(no_conv), "--config", str(vision), "mode=stage",
                "stage=instruct", f"run_dir={tmp_path / 'run'}", f"data.root={parts['data']}",
                f"pretrained.qformer_vocab={parts['vocab']}",
                f"pretrained.llm={folder}", f"pretrained.llm_tokenizer={parts['llm_tokenizer']}",
                f"pretrained.hf_checkpoint={folder}", "pretrained.llm_dtype=fp32", "trainer.progress_bar=false",
                "model.qformer.num_query_tokens=4", "stage3.max_steps=1", "stage3.batch_size=4", *frozen])
    ck = torch.load(out["checkpoint"], map_location="cpu", weights_only=True)
    assert ck["stage"] == "instruct" and ck["global_step"] == 1
    state, theirs = ck["state_dict"], hf.state_dict()
    pairs = {"model.qformer.query_tokens": "query_tokens",
             "model.ln_vision.weight": "vision_model.post_layernorm.weight",
             "model.llm_proj.weight": "language_projection.weight",
             "model.qformer.bert.encoder.layer.1.output_query.dense.weight":
                 "qformer.encoder.layer.1.output_query.dense.weight"}
    for ours, key in pairs.items():
        torch.testing.assert_close(state[ours], theirs[key], rtol=0, atol=1e-8, msg=ours)
    # eval.py rebuilds the frozen encoder and LLM from the folder named in the run's config.yaml
    from eval import main as eval_main

    face = tmp_path / "face.png"
    Image.new("RGB", (80, 96), (150, 120, 100)).save(face)
    answer = eval_main(["ask", "--run", str(tmp_path / "run"), "--image", str(face), "--question",
                        "Is the inner brow raised?"])
    assert isinstance(answer, str)


def test_a_folder_whose_language_model_is_not_a_llama_is_refused_naming_its_type(tmp_path):
    _, folder = _folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["model_type"] = "opt"  # BLIP-2 OPT: not implemented
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json.*'opt'"):
        load_hf_llama(folder)


def test_each_loader_reads_only_its_part_of_the_folder_and_casts_as_it_reads(tmp_path, monkeypatch):
    """A real InstructBLIP folder holds a 7B LLM beside a 1B ViT: the encoder and Q-Former loaders must
    not read the LLM, the LLM loader not the ViT, and fp16 is cast tensor by tensor."""
    from expvl.models.convert import weights as convert

    hf, folder = _folder(tmp_path, layout="transformers 4")  # sharded
    read: list[str] = []

    class Spy:
        def __init__(self, path, framework):
            self.f = convert_safe_open(path, framework=framework)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    convert_safe_open = convert.safe_open
    monkeypatch.setattr(convert, "safe_open", Spy)
    custom = VisionConfig(custom=EVA_CUSTOM, image_size=SIZE, layer=-2, pretrained=str(folder))
    VisionEncoder(custom)
    assert read and all(k.startswith("vision_model.") for k in read)
    read.clear()
    llm = load_hf_llama(folder, dtype=torch.float16)
    assert read and all(k.startswith("language_model.") for k in read)
    assert {p.dtype for p in llm.parameters()} == {torch.float16}
    torch.testing.assert_close(llm.lm_head.weight, hf.language_model.lm_head.weight.half(), rtol=0, atol=0)
    read.clear()
    ours = _ours(folder)  # reads all three parts again; count the Q-Former loader's reads alone
    read.clear()
    init_stage_weights(ours, PretrainedConfig(hf_checkpoint=str(folder)))
    assert "query_tokens" in read and "vision_model.post_layernorm.weight" in read
    assert not [k for k in read if k.startswith("language_model.")
                or (k.startswith("vision_model.") and "post_layernorm" not in k)]


def test_the_recipe_takes_one_folder_through_environment_variables(tmp_path, monkeypatch):
    """README "Real recipes": the Exp-VQA recipe with every part from one InstructBlip folder."""
    from expvl.configs import CONFIG_DIR, load_config

    folder = tmp_path / "instructblip-vicuna-7b"
    env = {"INSTRUCTBLIP_HF": folder, "EVA_VIT_G": folder, "LLM_DIR": folder,
           "LLM_TOKENIZER": folder / "tokenizer.model", "BERT_VOCAB": folder / "qformer_tokenizer" / "vocab.txt",
           "DATA_ROOT": tmp_path / "data"}
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("INSTRUCTBLIP", raising=False)
    recipes = CONFIG_DIR / "recipes"
    cfg = load_config(RunConfig, [recipes / "_blip2_vitg.yaml", recipes / "expvqa_vicuna7b.yaml"])
    p = cfg.pretrained
    assert p.hf_checkpoint == p.llm == cfg.model.vision.pretrained == str(folder) and not p.lavis_checkpoint
    monkeypatch.setenv("INSTRUCTBLIP", str(tmp_path / "instruct_blip_vicuna7b_trimmed.pth"))
    with pytest.raises(ValueError, match="set one"):
        load_config(RunConfig, [recipes / "_blip2_vitg.yaml", recipes / "expvqa_vicuna7b.yaml"])
