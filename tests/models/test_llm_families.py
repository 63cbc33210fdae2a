"""Mistral, Qwen2 / Qwen2.5 and Qwen3 through models/llm.py's LLaMA, against transformers' own classes.

Each variant is a tiny random `MistralForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` (every
weight perturbed, so a forgotten bias or norm shows), saved by `save_pretrained` and loaded through
`load_hf_llm`. The variants are not the shapes of any real checkpoint: head_dim apart from
hidden / heads, MHA, GQA and MQA, tied and untied embeddings, odd vocabularies, sliding windows
shorter than the sequences (so the window really cuts), only some blocks windowed (Qwen's
max_window_layers). Checked: logits with left padding and with a soft prompt (inputs_embeds),
KV-cache decoding == one full forward, greedy and beam generation token-identical to `generate`,
strict weight maps, loading from a Blip2 / InstructBlip folder, real sizes on `meta`, Qwen's
byte-level BPE tokenizer without BOS and Mistral's SentencePiece one against transformers'
tokenizers, and a few steps of stage 2, stage 3 and VL-FAU around each family (loss falls, it generates).
"""

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from expvl.models.convert.hf_export import hf_config_dict
from expvl.models.convert.hf_llm import FAMILIES, SUPPORTED, load_hf_llm
from expvl.models.convert.llama import hf_llama_key_map, load_hf_llama
from expvl.models.convert.weights import CheckpointError, load_mapped
from expvl.models.generation import GenerationConfig, generate
from expvl.models.kv_cache import KVCache
from expvl.models.llm import HF_FAMILIES, LLaMA, LLMConfig
from expvl.models.tokenizer import JSONTokenizer, SPTokenizer, llm_tokenizer
from tests.helpers.llm import HF_CLASSES, hf_family, left_padded, single_thread, train_steps  # noqa: F401  (autouse fixture)

transformers = pytest.importorskip("transformers")

ROPE_1E6 = {"rope_type": "default", "rope_theta": 1e6}  # Qwen's rope_theta
# name -> (model_type, transformers config overrides, a key its checkpoint must have, a key it must not)
VARIANTS = {
    "mistral-window-mqa-head_dim": ("mistral", dict(vocab_size=67, num_key_value_heads=1, head_dim=12,
                                                    sliding_window=5),
                                    "model.layers.1.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.bias"),
    "mistral-tied-mha-nowindow": ("mistral", dict(vocab_size=61, num_key_value_heads=4, tie_word_embeddings=True,
                                                  sliding_window=None),
                                  "model.layers.0.mlp.up_proj.weight", "lm_head.bias"),
    "qwen2-tied-gqa": ("qwen2", dict(vocab_size=61, tie_word_embeddings=True, rope_parameters=ROPE_1E6,
                                     sliding_window=3, max_window_layers=0),  # window without use_sliding_window
                       "model.layers.1.self_attn.v_proj.bias", "model.layers.0.self_attn.o_proj.bias"),
    "qwen2-window-last-blocks": ("qwen2", dict(vocab_size=71, num_hidden_layers=3, num_key_value_heads=1,
                                               use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                               rope_parameters=ROPE_1E6),
                                 "model.layers.2.self_attn.q_proj.bias", "model.layers.2.self_attn.q_norm.weight"),
    "qwen3-head_dim-tied": ("qwen3", dict(vocab_size=61, head_dim=16, tie_word_embeddings=True,
                                          rope_parameters=ROPE_1E6),
                            "model.layers.1.self_attn.k_norm.weight", "model.layers.0.self_attn.q_proj.bias"),
    "qwen3-bias-window-mha": ("qwen3", dict(vocab_size=73, head_dim=6, num_key_value_heads=4, attention_bias=True,
                                            use_sliding_window=True, sliding_window=5, max_window_layers=0),
                              "model.layers.0.self_attn.q_norm.weight", "model.layers.1.mlp.down_proj.bias"),
}
TYPES = ("mistral", "qwen2", "qwen3")
FIRST_OF = {t: next(n for n, v in VARIANTS.items() if v[0] == t) for t in TYPES}  # one variant per family


@pytest.fixture(scope="module", params=list(VARIANTS))
def family(request, tmp_path_factory):
    """(name, transformers model, ours, the folder it was saved to)."""
    model_type, kw, _, _ = VARIANTS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    hf, ours = hf_family(folder, model_type, seed=3, **kw)
    return request.param, hf, ours, folder


def hf_positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_the_config_is_the_family_s(family):
    name, hf, ours, _ = family
    c, h = ours.config, hf.config
    model_type = VARIANTS[name][0]
    assert (c.head_size, c.kv_heads, c.vocab_size) == (h.head_dim if getattr(h, "head_dim", None) else 8,
                                                       h.num_key_value_heads, h.vocab_size)
    assert (ours.lm_head is None) == bool(h.tie_word_embeddings)
    assert c.qkv_bias == (model_type == "qwen2" or bool(getattr(h, "attention_bias", False)))
    assert c.o_bias == (model_type == "qwen3" and bool(h.attention_bias))
    assert c.qk_norm == (model_type == "qwen3")
    windowed = [i for i in range(c.n_layers) if c.uses_window(i)]
    if model_type == "mistral":
        assert windowed == ([] if h.sliding_window is None else list(range(c.n_layers)))
    else:
        assert windowed == [i for i, t in enumerate(h.layer_types) if t == "sliding_attention"]
    assert c.sliding_window == (h.sliding_window if windowed else None)


def test_logits_match_transformers_with_left_padding_and_a_soft_prompt(family):
    _, hf, ours, _ = family
    ids, mask = left_padded(T=9, pads=(3, 0, 5))
    real = mask.bool()
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        assert max_diff(ours(input_ids=ids)["logits"], ref) < 1e-4
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        out = ours(input_ids=ids, attention_mask=mask)["logits"]
        assert max_diff(out[real], ref[real]) < 1e-4
        # a soft prompt before the text, as BLIP-2 feeds the LLM: random vectors, always attended
        g = torch.Generator().manual_seed(5)
        soft = torch.randn(3, 4, ours.config.dim, generator=g)
        embeds, full_mask = ours.prefixed(soft, ids, mask)
        ref = hf(inputs_embeds=embeds, attention_mask=full_mask, position_ids=hf_positions(full_mask)).logits
        out = ours(inputs_embeds=embeds, attention_mask=full_mask)["logits"]
        real = full_mask.bool()
        assert max_diff(out[real], ref[real]) < 1e-4


def test_kv_cache_incremental_equals_full_forward(family):
    _, _, model, _ = family
    ids, mask = left_padded(T=12, pads=(3, 0, 6))
    real = mask.bool()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask)["logits"]
        cache = KVCache(model.config.n_layers)
        steps = [model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], cache=cache)["logits"]
                 for a, b in [(0, 4), (4, 5), (5, 9), (9, 10), (10, 12)]]  # steps that cross the window
        assert max_diff(torch.cat(steps, 1)[real], full[real]) < 1e-5
        full = model(input_ids=ids)["logits"]
        cache = KVCache(model.config.n_layers)
        steps = [model(input_ids=ids[:, a:b], cache=cache)["logits"] for a, b in [(0, 7), (7, 8), (8, 12)]]
        assert max_diff(torch.cat(steps, 1), full) < 1e-5


SETTINGS = [dict(num_beams=1), dict(num_beams=3, length_penalty=0.6),
            dict(num_beams=3, length_penalty=2.0, num_return_sequences=2)]


@pytest.mark.parametrize("prompt", ["input_ids", "inputs_embeds"])
def test_greedy_and_beam_generation_token_identical_to_transformers(family, prompt):
    """Prompt 6 + 10 new tokens: every windowed variant's window is crossed while generating."""
    _, hf, ours, _ = family
    ids, mask = left_padded(T=6, pads=(2, 0, 4))
    for kw in SETTINGS:
        cfg = GenerationConfig(max_new_tokens=10, pad_token_id=1, **kw)
        hf_kw = dict(do_sample=False, pad_token_id=1, max_new_tokens=10, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if prompt == "input_ids":
                out = generate(ours, input_ids=ids, attention_mask=mask, config=cfg)["sequences"]
                ref = hf.generate(input_ids=ids, attention_mask=mask, **hf_kw)[:, ids.shape[1]:]
            else:
                emb = ours.embed(ids).detach()
                out = generate(ours, inputs_embeds=emb, attention_mask=mask, config=cfg)["sequences"]
                ref = hf.generate(inputs_embeds=emb, attention_mask=mask, **hf_kw)
        assert out.shape == (3 * kw.get("num_return_sequences", 1), 10)
        assert torch.equal(out, ref), (kw, out, ref)


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_strict_weight_map_names_a_missing_and_an_unexpected_key(family, tmp_path):
    name, _, _, folder = family
    _, _, needed, foreign = VARIANTS[name]
    folder = _copy(folder, tmp_path)
    f = folder / "model.safetensors"
    good = load_file(f)
    assert needed in good and foreign not in good
    save_file({k: v for k, v in good.items() if k != needed}, f)
    with pytest.raises(CheckpointError, match=r"missing key.*" + needed.replace(".", r"\.")):
        load_hf_llm(folder)
    save_file({**good, foreign: torch.zeros(4)}, f)
    with pytest.raises(CheckpointError, match=r"unexpected key.*" + foreign.replace(".", r"\.")):
        load_hf_llm(folder)
    save_file({**good, needed: torch.zeros(3)}, f)
    with pytest.raises(CheckpointError, match=needed.replace(".", r"\.") + r" has shape \(3,\)"):
        load_hf_llm(folder)


def test_every_family_of_the_decoder_has_a_loader_and_others_are_refused(tmp_path):
    assert set(HF_FAMILIES) <= set(FAMILIES) and set(TYPES) <= set(SUPPORTED)
    name = FIRST_OF["qwen3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_family(tmp_path, "qwen3", **VARIANTS[name][1])
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gemma2"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'gemma2' is not a supported .*; "
                                              r"supported: " + ", ".join(SUPPORTED)):
        load_hf_llm(tmp_path)
    with pytest.raises(CheckpointError, match=r"config\.json.*'gemma2'.*llama, mistral, qwen2, qwen3"):
        load_hf_llama(tmp_path)  # the decoder's own loader refuses it too, naming what it reads


VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
          "image_size": 28, "patch_size": 14, "qkv_bias": True}
QFORMER = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64,
           "encoder_hidden_size": 32, "vocab_size": 50, "max_position_embeddings": 32}


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("kind", ["blip2", "instructblip"])
def test_a_blip2_folder_around_each_family_loads_its_language_model(model_type, kind, tmp_path):
    config_cls, model_cls = {"blip2": (transformers.Blip2Config, transformers.Blip2ForConditionalGeneration),
                             "instructblip": (transformers.InstructBlipConfig,
                                              transformers.InstructBlipForConditionalGeneration)}[kind]
    kw = VARIANTS[FIRST_OF[model_type]][1]
    text = getattr(transformers, HF_CLASSES[model_type][0])(**{
        "hidden_size": 32, "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, **kw}).to_dict()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = model_cls(config_cls(vision_config=VISION, qformer_config=QFORMER, text_config=text,
                                  num_query_tokens=4)).eval()
        with torch.no_grad():
            for p in hf.language_model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        hf.save_pretrained(tmp_path)
    ours = load_hf_llm(tmp_path).eval()
    ids, mask = left_padded(T=9, pads=(3, 0, 5))
    real = mask.bool()
    with torch.no_grad():
        ref = hf.language_model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        out = ours(input_ids=ids, attention_mask=mask)["logits"]
    assert max_diff(out[real], ref[real]) < 1e-4


# real shapes on the meta device: (transformers config, billions of parameters)
FULL_SIZE = {
    "mistral-7b-v0.1": ("mistral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                        sliding_window=4096), 7.24),
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                                   sliding_window=32768, max_window_layers=21, rope_parameters=ROPE_1E6), 0.49),
    "qwen3-0.6b": ("qwen3", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 tie_word_embeddings=True, rope_parameters=ROPE_1E6), 0.60),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_map_on_meta(name):
    model_type, kw, billions = FULL_SIZE[name]
    config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[model_type])
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_cfg = config_cls(**kw)
        hf_sd = model_cls(hf_cfg).state_dict()
        ours = LLaMA(LLMConfig.from_hf_json(hf_cfg.to_dict()))
    if hf_cfg.tie_word_embeddings:
        hf_sd.pop("lm_head.weight", None)  # the tied head is the embedding matrix, not stored
    key_map = hf_llama_key_map(ours.config)
    assert set(key_map.values()) == set(hf_sd)
    load_mapped(ours, hf_sd, key_map, what=name)  # raises on any missing / extra / mis-shaped key
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(t.numel() for t in hf_sd.values()) and abs(n / 1e9 - billions) < 0.01


def test_config_json_switches_as_transformers_reads_them():
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2)
    # Qwen2.5's own config.json: a window declared but switched off (transformers 4 style, no layer_types)
    qwen = LLMConfig.from_hf_json(dict(base, model_type="qwen2", sliding_window=32768, use_sliding_window=False,
                                       max_window_layers=21, rope_theta=1e6, tie_word_embeddings=True))
    assert (qwen.sliding_window, qwen.qkv_bias, qwen.o_bias, qwen.rope_theta) == (None, True, False, 1e6)
    assert qwen.tie_embeddings
    on = LLMConfig.from_hf_json(dict(base, model_type="qwen2", sliding_window=8, use_sliding_window=True,
                                     max_window_layers=3))
    assert [on.uses_window(i) for i in range(4)] == [False, False, False, True]
    assert LLMConfig.from_hf_json(dict(base, model_type="qwen2", attention_bias=False)).qkv_bias  # always biased
    # Mistral without the key: MistralConfig's default window
    assert LLMConfig.from_hf_json(dict(base, model_type="mistral")).sliding_window == 4096
    assert LLMConfig.from_hf_json(dict(base, model_type="mistral", sliding_window=None)).sliding_window is None
    # a LLaMA ignores a sliding_window, as LlamaForCausalLM does
    assert LLMConfig.from_hf_json(dict(base, model_type="llama", sliding_window=16)).sliding_window is None
    q3 = LLMConfig.from_hf_json(dict(base, model_type="qwen3", head_dim=32, attention_bias=True))
    assert (q3.qk_norm, q3.qkv_bias, q3.o_bias, q3.head_size) == (True, True, True, 32)
    with pytest.raises(ValueError, match="layer_types"):
        LLMConfig.from_hf_json(dict(base, model_type="qwen3", use_sliding_window=True, sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention"] * 2))
    with pytest.raises(ValueError, match="'gemma2'.*llama, mistral, qwen2, qwen3"):
        LLMConfig.from_hf_json(dict(base, model_type="gemma2"))


def test_export_refuses_what_a_llama_config_json_cannot_state():
    with pytest.raises(ValueError, match="qkv_bias != o_bias"):
        hf_config_dict(LLaMA(LLMConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, hidden_dim=8, qkv_bias=True)))
    with pytest.raises(ValueError, match="qk_norm, sliding_window"):
        hf_config_dict(LLaMA(LLMConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, hidden_dim=8, qk_norm=True,
                                       sliding_window=4)))


# ------------------------------------------------------------------------------------------ tokenizers

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The person raises the inner brows and pulls the lip corners up.",
          "Is the upper lip raised? yes", "Is the jaw dropped? no", "AU12: lip corner puller, intensity 3.",
          "A happy face: cheeks raised, lips parted."] * 20
TEXTS = ["Is the inner brow raised?", "AU1+AU2 = 123456", "The lip corners are pulled up.\nYes",
         "émotion 😀 joie", "<|im_start|>user\nIs the jaw dropped?<|im_end|>\n"]


def _qwen_tokenizer(d, eos):
    """A tiny byte-level BPE built as Qwen2's tokenizer.json is: NFC, Qwen's split regex (digits one
    by one), byte-level alphabet, a ByteLevel post-processor that adds no BOS, specials after the
    learned tokens; tokenizer_config.json with `"bos_token": null`."""
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(QWEN_SPECIALS)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": eos, "pad_token": "<|endoftext|>",
        "unk_token": None, "add_prefix_space": False, "model_max_length": 32768}))
    return d


@pytest.mark.parametrize("eos", ["<|im_end|>", "<|endoftext|>"])  # Qwen's instruct and base models
def test_qwen_tokenizer_without_bos_gives_transformers_ids(tmp_path, eos):
    from expvl.datamodules.collate import build_instruct_sequences

    folder = _qwen_tokenizer(tmp_path / "qwen", eos)
    ours = llm_tokenizer(folder / "tokenizer.json")
    assert isinstance(ours, JSONTokenizer) and ours.bos_id is None
    assert (ours.eos_id, ours.pad_id) == (ours.tok.token_to_id(eos), ours.tok.token_to_id("<|endoftext|>"))
    for hf in (transformers.AutoTokenizer.from_pretrained(str(folder)),
               transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))):
        for text in TEXTS:
            ids = ours.encode(text)  # bos=True adds nothing
            assert ids == ours.encode(text, bos=False) == hf(text).input_ids, text
            assert ours.encode(text, eos=True) == ids + [ours.eos_id]
        assert ours.decode(ours.encode(TEXTS[3])) == TEXTS[3]
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf.bos_token is None and ours.vocab_size == len(hf)
    got = ours.batch_encode(TEXTS, padding_side="left")  # the generation prompt (evaluation/answerer.py)
    want = hf(TEXTS, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["attention_mask"], want["attention_mask"])
    # stage-3 rows: [prompt | answer EOS], the prompt cut on the left without a BOS to keep
    batch = build_instruct_sequences(ours, ["Is the jaw dropped?", TEXTS[2] * 3], ["no", "yes"], max_input_len=8,
                                     max_output_len=4)
    answer = ours.encode("yes", bos=False, eos=True)
    row = batch["llm_ids"][1][batch["llm_mask"][1].bool()].tolist()
    assert row == ours.encode(TEXTS[2] * 3)[-8:] + answer
    assert batch["labels"][1, 8:8 + len(answer)].tolist() == answer
    assert batch["llm_ids"][0, 0] == ours.encode("Is the jaw dropped?")[0]


def test_a_tokenizer_config_that_does_not_say_bos_is_still_refused(tmp_path):
    folder = _qwen_tokenizer(tmp_path / "qwen", "<|im_end|>")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["bos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r'names no bos_token \(write "bos_token": null'):
        JSONTokenizer(folder / "tokenizer.json")


def test_mistral_sentencepiece_tokenizer_gives_transformers_ids(tmp_path):
    """Mistral-7B's tokenizer.model follows LLaMA's conventions (<unk>=0, <s>=1 as BOS, </s>=2)."""
    sp = SPTokenizer.train(CORPUS, tmp_path / "tokenizer.model", vocab_size=300)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    ours = llm_tokenizer(tmp_path / "tokenizer.model")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (ours.unk_id, ours.bos_id, ours.eos_id) == (0, 1, 2) == (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id)
    for text in TEXTS[:4]:  # no leading whitespace: there transformers' conversion and SentencePiece differ
        assert ours.encode(text) == hf(text).input_ids and ours.encode(text)[0] == 1, text
    assert sp.decode(sp.encode(TEXTS[2])) == TEXTS[2]


# ------------------------------------------------------------------------------------------ stage 3

@pytest.mark.parametrize("model_type", TYPES)
def test_each_family_trains_through_stage3_and_answers(model_type, tmp_path):
    from expvl.models.blip2 import Blip2, Blip2Config
    from expvl.models.qformer import QFormerConfig
    from expvl.models.vision import VisionConfig
    from expvl.training.lit_base import freeze
    from expvl.training.stages import trainable

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, llm = hf_family(tmp_path, model_type, **VARIANTS[FIRST_OF[model_type]][1])
    qf = QFormerConfig.from_name("tiny", hidden_dropout=0.0, attention_dropout=0.0, vocab_size=40)
    torch.manual_seed(0)
    model = Blip2(Blip2Config(stage="instruct", vision=VisionConfig.from_name("tiny-vit"), qformer=qf,
                              llm=llm.config, embed_dim=16), llm=llm)
    freeze(model, trainable(model))
    assert not any(p.requires_grad for p in model.llm.parameters())
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 64, 64, generator=g)
    qf_ids = torch.randint(5, 40, (4, 6), generator=g)
    qf_ids[:, 0] = 2
    qf_mask = torch.ones_like(qf_ids)
    llm_ids = torch.randint(3, 61, (4, 8), generator=g)
    labels = llm_ids.masked_fill(torch.arange(8) < 5, -100)  # the answer: the last 3 tokens
    mask = torch.ones_like(llm_ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model.lm_loss(model.encode_image(images), llm_ids, mask, labels, instruction_ids=qf_ids,
                             instruction_mask=qf_mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    prompt, pmask = llm_ids[:2, :5].clone(), mask[:2, :5].clone()
    pmask[0, :2] = 0  # left padding
    seq = model.generate(model.encode_image(images[:2]), prompt, pmask,
                         GenerationConfig(max_new_tokens=4, eos_token_id=2, pad_token_id=0),
                         instruction_ids=qf_ids[:2], instruction_mask=qf_mask[:2])
    assert seq.dtype == torch.long and seq.shape[0] == 2 and 1 <= seq.shape[1] <= 4
    assert ((0 <= seq) & (seq < llm.config.vocab_size)).all()


# ------------------------------------------------------------------------------ stage 2 and VL-FAU

@pytest.fixture(scope="module")
def vlfau_tokenizer(tmp_path_factory):
    from tests.training.test_vlfau import AUS, global_text, local_description

    texts = [local_description(a, i) for a in AUS for i in (None, 1.0, 3.0, 4.5)]
    texts += [global_text(AUS[:k]) for k in range(len(AUS) + 1)] + [global_text(AUS[k:]) for k in range(len(AUS))]
    return SPTokenizer.train(texts, tmp_path_factory.mktemp("tok") / "sp.model", vocab_size=400)


@pytest.mark.parametrize("model_type", TYPES)
def test_each_family_trains_stage2_captions_and_writes_one(model_type, tmp_path):
    from expvl.models.blip2 import Blip2, Blip2Config
    from expvl.models.vision import VisionConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, llm = hf_family(tmp_path, model_type, **VARIANTS[FIRST_OF[model_type]][1])
    torch.manual_seed(0)
    model = Blip2(Blip2Config(stage="caption", vision=VisionConfig.from_name("tiny-vit"), llm=llm.config), llm=llm)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        feats = model.vision(torch.randn(4, 3, 64, 64, generator=g))
    ids = torch.randint(3, llm.config.vocab_size, (4, 7), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    labels = ids.masked_fill(torch.arange(7) < 1, -100)
    first, last = train_steps(model, lambda: model.lm_loss(model.embed_features(feats), ids, mask, labels)["loss"],
                              steps=100)
    assert last < 0.6 * first, (first, last)
    with torch.no_grad():
        seq = model.generate(model.embed_features(feats[:2]), ids[:2, :1], mask[:2, :1],
                             GenerationConfig(max_new_tokens=6, eos_token_id=2, pad_token_id=0))
    assert seq.shape[0] == 2 and 1 <= seq.shape[1] <= 6 and ((0 <= seq) & (seq < llm.config.vocab_size)).all()


@pytest.mark.parametrize("model_type", TYPES)
def test_each_family_trains_vlfau_and_explains(model_type, vlfau_tokenizer, tmp_path):
    from expvl.datamodules.vlfau import VLFAUCollate
    from expvl.models.qformer import QFormerConfig
    from expvl.models.vlfau import VLFAU, VLFAUConfig
    from tests.training.test_vlfau import AUS, WIDTH, make_data

    tok = vlfau_tokenizer
    kw = dict(VARIANTS[FIRST_OF[model_type]][1], vocab_size=tok.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, llm = hf_family(tmp_path, model_type, **kw)
    cfg = VLFAUConfig(aus=AUS, vision=None, feature_width=WIDTH, llm=llm.config, max_global_len=48,
                      qformer=QFormerConfig.from_name("tiny", num_query_tokens=2, hidden_dropout=0.0,
                                                      attention_dropout=0.0),
                      local_max_new_tokens=12, global_max_new_tokens=16)
    torch.manual_seed(0)
    model = VLFAU(cfg, llm=llm)
    feats, records = make_data(16, seed=3)
    batch = VLFAUCollate(tok, cfg).encode(records)
    lang = {k: batch[k] for k in batch if k.startswith(("local_", "global_")) and "texts" not in k}
    first, last = train_steps(
        model, lambda: model.losses(model.embed_features(feats), batch["aus"], batch["au_mask"], **lang)["loss"],
        steps=60)
    assert last < 0.8 * first, (first, last)  # a random decoder with perturbed weights: slower than a trained one
    with torch.no_grad():
        out = model.explain(model.embed_features(feats[:4]), tok)
    assert len(out) == 4 and all(isinstance(e.global_text, str) and set(e.probs) == set(AUS) for e in out)
