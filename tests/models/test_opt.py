"""The hand-written OPT (models/opt.py) and its converter (models/convert/opt.py) against transformers.

The oracle is transformers' `OPTForCausalLM`: tiny random models (pre-LN like OPT-2.7B / 6.7B, and
350m's post-LN layout with project_in / project_out) are saved with `save_pretrained`, loaded through
our strict map, and must give the same logits (left padding included: OPT's positions come from the
mask), the same cached decoding, the same greedy and beam tokens, and the same loss after a soft
prompt. The tokenizer is a tiny GPT-2-style byte-level BPE with OPT's specials (`<s>` 0, `<pad>` 1,
`</s>` 2 as BOS and EOS), read by our JSONTokenizer and by transformers' GPT2Tokenizer from the same
files. `hf_opt_folder` and `write_opt_tokenizer` are shared with tests/models/test_blip2_opt.py.
"""

import json
import warnings
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from expvl.datamodules.collate import CaptionCollate, TextConfig, caption_end_id
from expvl.models.convert.opt import hf_opt_key_map, load_hf_opt, opt_config_from_hf
from expvl.models.convert.weights import CheckpointError
from expvl.models.generation import GenerationConfig, build_decoder, generate, score_candidates
from expvl.models.kv_cache import KVCache
from expvl.models.llm import resize_vocab
from expvl.models.opt import OPT, OPTConfig
from expvl.models.tokenizer import JSONTokenizer
from tests.helpers.llm import single_thread  # noqa: F401 -- one CPU thread for this module

transformers = pytest.importorskip("transformers")

VOCAB = 64
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=64, init_std=0.2)
LAYOUTS = {
    "pre-LN (OPT-2.7B / 6.7B)": {},
    "post-LN, project_in/out (OPT-350m)": dict(do_layer_norm_before=False, word_embed_proj_dim=16),
    "no biases, no LayerNorm affine": dict(enable_bias=False, layer_norm_elementwise_affine=False),
}
OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # facebook/opt's ids 0..3
CORPUS = ["The face shows happiness.", "It is a people who raises upper lip, tightens lip corner and presses lips.",
          "Question: is the inner brow raised? Answer: yes", "The person is frowning.\nThe face shows anger.",
          "the brows are lowered and the lips pressed, which suggests anger"] * 20


def hf_opt_folder(folder, seed=0, **overrides):
    """A tiny random transformers OPTForCausalLM (every weight perturbed) saved into `folder`."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.OPTForCausalLM(transformers.OPTConfig(**(TINY | overrides))).eval()
        with torch.no_grad():  # HF initialises biases and norms to constants: make every weight count
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        hf.save_pretrained(folder)
    return hf


def write_opt_tokenizer(folder, corpus=CORPUS, vocab_size=300):
    """tokenizer.json (GPT-2 byte-level BPE, OPT's specials first, BOS `</s>` prepended by the template, as
    OPT's tokenizer does) and tokenizer_config.json as facebook/opt ships it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=OPT_SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "bos_token": "</s>", "eos_token": "</s>",
        "unk_token": "</s>", "pad_token": "<pad>"}))
    return folder


def _tiny(tmp_path, **overrides):
    hf = hf_opt_folder(tmp_path, **overrides)
    return hf, load_hf_opt(tmp_path).eval()


def _left_padded(B=3, T=9, pads=(3, 0, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        ids[b, :p] = 1  # <pad>
    return ids, mask


# ---- the forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_equal_transformers_with_left_padding(tmp_path, layout):
    hf, ours = _tiny(tmp_path, **LAYOUTS[layout])
    ids, mask = _left_padded()
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask)["logits"]
        # the soft-prompt path: vectors of the token-embedding width, with the padding after them
        embeds = torch.randn(3, 9, ours.config.dim, generator=torch.Generator().manual_seed(2))
        theirs_e = hf(inputs_embeds=embeds, attention_mask=mask).logits
        got_e = ours(inputs_embeds=embeds, attention_mask=mask)["logits"]
        unpadded = ours(input_ids=ids[1:2])["logits"]  # no mask at all: positions 0..T-1
    diff = max((got - theirs)[real].abs().max(), (got_e - theirs_e)[real].abs().max())
    print(f"max |logit difference| vs transformers ({layout}): {float(diff):.2e}")
    assert got.shape == (3, 9, VOCAB) and diff < 1e-4
    torch.testing.assert_close(unpadded[0], theirs[1], rtol=1e-4, atol=1e-4)
    assert (ours.model.project_in is None) == ("word_embed_proj_dim" not in LAYOUTS[layout])


def test_positions_are_counted_from_the_mask_so_left_padding_changes_nothing(tmp_path):
    """A left-padded row gives the logits of the same tokens unpadded (OPT's learned positions start at the
    first real token), which a position counter that ignored the mask would break."""
    _, ours = _tiny(tmp_path)
    ids, mask = _left_padded()
    with torch.no_grad():
        padded = ours(input_ids=ids, attention_mask=mask)["logits"][0, 3:]
        alone = ours(input_ids=ids[:1, 3:])["logits"][0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_the_full_forward(tmp_path):
    _, ours = _tiny(tmp_path, **LAYOUTS["post-LN, project_in/out (OPT-350m)"])
    ids, mask = _left_padded()
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask)["logits"]
        cache = KVCache(ours.config.n_layers)
        steps = [ours(input_ids=ids[:, :5], attention_mask=mask[:, :5], cache=cache)["logits"]]
        for t in range(5, 9):  # one token at a time, the whole mask each time, as generation calls it
            steps.append(ours(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache)["logits"])
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-5, atol=1e-5)
    assert cache.length == 9


def test_greedy_and_beam_generation_are_token_identical_to_transformers(tmp_path):
    hf, ours = _tiny(tmp_path)
    ids, mask = _left_padded()
    for beams in (1, 3):
        with torch.no_grad():
            theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                 num_beams=beams, eos_token_id=5, pad_token_id=1, min_new_tokens=0)[:, ids.shape[1]:]
        cfg = GenerationConfig(max_new_tokens=8, num_beams=beams, eos_token_id=5, pad_token_id=1)
        got = generate(ours, input_ids=ids, attention_mask=mask, config=cfg)["sequences"]
        assert got.tolist() == theirs[:, :got.shape[1]].tolist(), beams
        assert (theirs[:, got.shape[1]:] == 1).all()


def test_loss_after_a_soft_prompt_equals_transformers(tmp_path):
    """BLIP-2 OPT's training loss: [soft prompt | BOS caption], every real text token a target."""
    hf, ours = _tiny(tmp_path)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randn(2, 4, 32, generator=g, requires_grad=True)
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    labels = ids.masked_fill(mask == 0, -100)
    loss = ours.prefixed_loss(prompt, ids, mask, labels)
    embeds = torch.cat([prompt, hf.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(2, 4, dtype=torch.long), mask], 1)
    theirs = hf(inputs_embeds=embeds, attention_mask=full_mask,
                labels=torch.cat([torch.full((2, 4), -100), labels], 1)).loss
    torch.testing.assert_close(loss, theirs, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0  # the frozen LLM passes gradients through


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    _, ours = _tiny(tmp_path)
    again = load_hf_opt(tmp_path, gradient_checkpointing=True)
    prompt = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(4))
    ids, mask = _left_padded(B=2, T=5, pads=(0, 2))
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for model in (ours, again):
        p = prompt.clone().requires_grad_(True)
        model.prefixed_loss(p, ids, mask, labels).backward()
        grads.append(p.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_candidate_scores_equal_the_full_forward_log_probs(tmp_path):
    _, ours = _tiny(tmp_path)
    ids, mask = _left_padded(B=2, T=6, pads=(2, 0))
    candidates = [[7], [9, 11, 13]]
    with torch.no_grad():
        scores = score_candidates(ours, input_ids=ids, attention_mask=mask, candidates=candidates)
        for b in range(2):
            for c, cand in enumerate(candidates):
                seq = torch.cat([ids[b:b + 1], torch.tensor([cand])], 1)
                m = torch.cat([mask[b:b + 1], torch.ones(1, len(cand), dtype=torch.long)], 1)
                logp = ours(input_ids=seq, attention_mask=m)["logits"].log_softmax(-1)[0]
                want = sum(logp[ids.shape[1] - 1 + i, tok] for i, tok in enumerate(cand))
                torch.testing.assert_close(scores[b, c], want, rtol=1e-4, atol=1e-4)


def test_resize_vocab_grows_the_tied_embedding_and_keeps_the_old_logits(tmp_path):
    _, ours = _tiny(tmp_path)
    ids, mask = _left_padded()
    with torch.no_grad():
        before = ours(input_ids=ids, attention_mask=mask)["logits"]
        resize_vocab(ours, VOCAB + 3)
        after = ours(input_ids=ids, attention_mask=mask)["logits"]
    assert ours.config.vocab_size == VOCAB + 3 and ours.lm_head is None and after.shape[-1] == VOCAB + 3
    torch.testing.assert_close(after[..., :VOCAB], before)
    assert isinstance(ours.config, OPTConfig) and ours.config.dim == 32  # replace() kept the family


def test_build_decoder_picks_the_family_by_config():
    assert isinstance(build_decoder(OPTConfig(vocab_size=10, hidden_size=8, n_layers=1, n_heads=2, ffn_dim=16)), OPT)
    with pytest.raises(TypeError, match="not a decoder config"):
        build_decoder(TextConfig())


# ---- the converter ----------------------------------------------------------------------------------


def test_config_json_fields_are_read_and_unsupported_ones_refused(tmp_path):
    hf_opt_folder(tmp_path, do_layer_norm_before=False, word_embed_proj_dim=16)
    cfg = opt_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert (cfg.pre_norm, cfg.word_embed_proj_dim, cfg.dim, cfg.hidden_size, cfg.has_final_norm) == (
        False, 16, 16, 32, False)
    with pytest.raises(ValueError, match="activation_function 'gelu'"):
        opt_config_from_hf(json.loads((tmp_path / "config.json").read_text()) | {"activation_function": "gelu"})
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2', expected 'opt'"):
        load_hf_opt(tmp_path)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    hf_opt_folder(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = "model.decoder.layers.1.fc2.bias"
    save_file({k: v for k, v in state.items() if k != key}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key.*layers\.1\.fc2\.bias"):
        load_hf_opt(tmp_path)
    save_file(state | {"model.decoder.layers.0.self_attn.rotary.inv_freq": torch.zeros(4)},
              tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected key.*rotary\.inv_freq"):
        load_hf_opt(tmp_path)
    save_file(state | {key: torch.zeros(7)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.1\.fc2\.bias has shape \(7,\)"):
        load_hf_opt(tmp_path)


def test_a_stored_head_must_be_the_tied_embedding(tmp_path):
    hf_opt_folder(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    emb = state["model.decoder.embed_tokens.weight"]
    save_file(state | {"lm_head.weight": emb.clone()}, tmp_path / "model.safetensors")
    load_hf_opt(tmp_path)  # a duplicate of the tied matrix is dropped
    save_file(state | {"lm_head.weight": emb + 1}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.decoder.embed_tokens.weight"):
        load_hf_opt(tmp_path)


def test_a_base_opt_model_state_dict_and_an_untied_head_load(tmp_path):
    hf = hf_opt_folder(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in state.items()}, tmp_path / "model.safetensors")
    ids, mask = _left_padded()
    with torch.no_grad():
        torch.testing.assert_close(load_hf_opt(tmp_path)(input_ids=ids, attention_mask=mask)["logits"][mask.bool()],
                                   hf(input_ids=ids, attention_mask=mask).logits[mask.bool()], rtol=1e-4, atol=1e-4)
    untied = hf_opt_folder(tmp_path / "untied", tie_word_embeddings=False)
    ours = load_hf_opt(tmp_path / "untied")
    assert ours.lm_head is not None and "lm_head.weight" in hf_opt_key_map(ours.config)
    torch.testing.assert_close(ours.lm_head.weight, untied.lm_head.weight)


def test_weights_are_cast_as_they_are_read(tmp_path):
    hf = hf_opt_folder(tmp_path)
    ours = load_hf_opt(tmp_path, dtype=torch.float16)
    assert {p.dtype for p in ours.parameters()} == {torch.float16} and ours.dtype == torch.float16
    torch.testing.assert_close(ours.model.embed_tokens.weight, hf.model.decoder.embed_tokens.weight.half())


def test_load_hf_llm_reads_an_opt_folder(tmp_path):
    from expvl.models.convert import SUPPORTED, load_hf_llm

    hf_opt_folder(tmp_path)
    assert "opt" in SUPPORTED and isinstance(load_hf_llm(tmp_path), OPT)


# ---- the tokenizer: GPT-2 byte-level BPE with OPT's specials --------------------------------------------


@pytest.fixture(scope="module")
def opt_tokenizer(tmp_path_factory):
    return write_opt_tokenizer(tmp_path_factory.mktemp("opt_tok"))


TEXTS = ["The face shows happiness.", "  two  spaces\tand a tab", "émotion 😀 joie", "AU1+AU2 = 123",
         "The lip corners are pulled up.\nYes", "\n"]


def test_token_ids_equal_transformers_opt_tokenizer(opt_tokenizer):
    ours = JSONTokenizer(opt_tokenizer / "tokenizer.json")
    hf = transformers.AutoTokenizer.from_pretrained(str(opt_tokenizer))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (2, 2, 1)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text).input_ids and ids[0] == 2, text  # BOS `</s>` first, as OPT's tokenizer adds it
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
    newline = hf("\n", add_special_tokens=False).input_ids  # how LAVIS blip2_opt finds its caption EOS
    assert len(newline) == 1 and ours.encode("\n", bos=False) == newline
    got = ours.batch_encode(TEXTS, padding_side="left")
    want = hf(TEXTS, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["attention_mask"],
                                                                          want["attention_mask"])


def test_captions_end_in_the_newline_token_under_blip2_opts_convention(opt_tokenizer):
    """text.caption_eos="\\n": each training caption is BOS + caption + "\\n" (tokenized as LAVIS tokenizes
    `t + "\\n"`), every token a target; the tokenizer's `</s>` is no target; truncation keeps the end."""
    tok = JSONTokenizer(opt_tokenizer / "tokenizer.json")
    hf = transformers.AutoTokenizer.from_pretrained(str(opt_tokenizer))
    text = TextConfig(caption_eos="\n", max_output_len=20)
    nl = caption_end_id(tok, text)
    assert nl == hf("\n", add_special_tokens=False).input_ids[0]
    captions = ["The face shows happiness.", "It is a people who raises upper lip, tightens lip corner."]
    items = [{"record": None, "sample": {"text": c}, "image": torch.zeros(3, 4, 4), "_pos": None} for c in captions]
    enc = CaptionCollate(tok, text)(items)
    first = hf(captions[0] + "\n").input_ids
    assert enc["llm_ids"][0, :len(first)].tolist() == first and enc["labels"][0, :len(first)].tolist() == first
    assert enc["labels"][0, len(first):].eq(-100).all()
    long_row = enc["llm_ids"][1].tolist()  # cut at max_output_len: it still ends in "\n"
    assert len(hf(captions[1] + "\n").input_ids) > 20
    assert len(long_row) == 20 and long_row[0] == 2 and long_row[-1] == nl and 2 not in long_row[1:]
    plain = CaptionCollate(tok, TextConfig(max_output_len=64))(items)  # no convention: the tokenizer's EOS
    assert plain["llm_ids"][0, len(first) - 1] == tok.eos_id and caption_end_id(tok, TextConfig()) is None
    with pytest.raises(ValueError, match=r"caption_eos 'The face' is 4 tokens .* must be exactly one"):
        caption_end_id(tok, TextConfig(caption_eos="The face"))


def test_a_full_size_opt_config_is_opt_6_7b():
    cfg = opt_config_from_hf(transformers.OPTConfig(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384,
                                                    num_attention_heads=32, word_embed_proj_dim=4096).to_dict())
    assert replace(cfg, attn_backend="math") == OPTConfig(attn_backend="math")  # our defaults are OPT-6.7B's
