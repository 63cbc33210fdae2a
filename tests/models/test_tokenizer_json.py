"""JSONTokenizer (a Hugging Face tokenizer.json, LLaMA-3's format) against transformers' PreTrainedTokenizerFast.

The file is a tiny byte-level BPE built like LLaMA-3's: its split regex, byte-level alphabet, the
<|begin_of_text|> / <|end_of_text|> / <|eot_id|> specials after the learned tokens, and a template
post-processor that prepends BOS (which transformers applies and we replace by adding BOS by id).
"""

import json

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from expvl.datamodules.collate import build_instruct_sequences
from expvl.models.tokenizer import JSONTokenizer, SPTokenizer, llm_tokenizer
from tests.helpers.stage_parts import (
    parts,  # noqa: F401 -- its module fixture (data, vocab.txt, a tiny LLaMA folder), reused
    stage_args,
)

transformers = pytest.importorskip("transformers")

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"]
CORPUS = ["The person raises the inner brows and pulls the lip corners up.",
          "Is the upper lip raised? yes", "Is the jaw dropped? no", "AU12: lip corner puller, intensity 3.",
          "A happy face: cheeks raised, lips parted."] * 20
TEXTS = ["Is the inner brow raised?", "  two  spaces and a tab\t", "émotion 😀 joie", "AU1+AU2 = 123456",
         "The lip corners are pulled up.\nYes"]


def _write_tokenizer(d, corpus, vocab_size):
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(SPECIALS)
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIALS[0]} $A", special_tokens=[(SPECIALS[0], bos)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[1],
        "pad_token": {"__type": "AddedToken", "content": SPECIALS[3], "special": True},  # older configs' form
        "model_max_length": 1024}))
    return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write_tokenizer(tmp_path_factory.mktemp("llama3_tok"), CORPUS, 400)


def _hf(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def test_encode_equals_transformers_with_bos_and_decode_round_trips(folder):
    ours, hf = JSONTokenizer(folder / "tokenizer.json"), _hf(folder)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text).input_ids and ids[0] == ours.bos_id
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
        assert ours.encode(text, bos=False, eos=True) == hf(text, add_special_tokens=False).input_ids + [ours.eos_id]
    assert ours.vocab_size == len(hf)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == tuple(hf.convert_tokens_to_ids([SPECIALS[0], SPECIALS[1],
                                                                                      SPECIALS[3]]))


def test_left_padded_batch_equals_transformers(folder):
    ours, hf = JSONTokenizer(folder / "tokenizer.json"), _hf(folder)
    got = ours.batch_encode(TEXTS, padding_side="left")
    want = hf(TEXTS, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])


def test_pad_defaults_to_eos_and_missing_specials_are_named(folder, tmp_path):
    (tmp_path / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    cfg = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[2]}  # an instruct model's <|eot_id|>, no pad
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = JSONTokenizer(tmp_path / "tokenizer.json")
    assert tok.pad_id == tok.eos_id == tok.tok.token_to_id(SPECIALS[2])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "bos_token": "<s>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: bos_token '<s>' is not a token"):
        JSONTokenizer(tmp_path / "tokenizer.json")


def test_llm_tokenizer_picks_by_file_and_feeds_instruction_batches(folder, tmp_path):
    tok = llm_tokenizer(folder / "tokenizer.json")
    assert isinstance(tok, JSONTokenizer)
    with pytest.raises(ValueError, match="instructblip-vicuna"):
        llm_tokenizer(folder / "tokenizer.json", convention="instructblip-vicuna")
    sp = SPTokenizer.train(CORPUS, tmp_path / "sp.model", vocab_size=300)
    assert isinstance(llm_tokenizer(sp.model_file), SPTokenizer)
    batch = build_instruct_sequences(tok, ["Is the jaw dropped?"], ["no"], max_input_len=32, max_output_len=8)
    answer = tok.encode("no", bos=False, eos=True)
    assert batch["labels"][0, -len(answer):].tolist() == answer and batch["llm_ids"][0, 0] == tok.bos_id


def test_a_stage3_run_trains_and_answers_with_a_tokenizer_json(parts, tmp_path):  # noqa: F811
    """train.py mode=stage with `pretrained.llm_tokenizer=<tokenizer.json>`: the LLM's vocabulary grows to
    the tokenizer's, stage 3 trains, and eval.py answers through it."""
    from PIL import Image

    import expvl
    from expvl.training.runs import open_run
    from expvl.vocab.shards import read_split_records
    from train import main

    splits = read_split_records(parts["data"]).values()
    texts = [f"{p.question} {p.answer}" for records in splits for r in records for p in r.vqa]
    big = _write_tokenizer(tmp_path, texts, 600)
    n = JSONTokenizer(big / "tokenizer.json").vocab_size
    assert n > parts["llm_vocab"] - 1  # more ids than the fixture LLM has rows
    run_dir = tmp_path / "run"
    out = main(stage_args(parts, run_dir, "instruct", f"pretrained.llm_tokenizer={big / 'tokenizer.json'}",
                          "stage3.max_steps=2", "stage3.batch_size=4"))
    ck = torch.load(out["checkpoint"], map_location="cpu", weights_only=True)
    assert ck["stage"] == "instruct"
    run = open_run(run_dir)
    assert isinstance(run.tokenizers["llm"], JSONTokenizer) and run.llm.config.vocab_size == n
    face = tmp_path / "face.png"
    Image.new("RGB", (80, 96), (150, 120, 100)).save(face)
    assert isinstance(expvl.load(run_dir).ask(face, "Is the inner brow raised?", max_new_tokens=4), str)


def test_a_tokenizer_json_without_its_config_says_so(folder, tmp_path):
    (tmp_path / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match=r"no tokenizer_config\.json beside it\): names no bos_token"):
        JSONTokenizer(tmp_path / "tokenizer.json")
