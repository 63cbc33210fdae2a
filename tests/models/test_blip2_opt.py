"""BLIP-2 OPT and Exp-BLIP end to end: transformers and LAVIS checkpoints with an OPT decoder.

The oracle is transformers: a tiny random `Blip2ForConditionalGeneration` whose language model is an
OPT (Salesforce/blip2-opt-2.7b's layout: `language_model.model.decoder.*`, `text_config.eos_token_id`
= the "\\n" token, as transformers' conversion of BLIP-2 OPT writes it) is saved with `save_pretrained`
beside a GPT-2-style tokenizer with OPT's specials. Opened with `expvl.load`, it must give
transformers' soft prompt (`get_image_features(...).pooler_output`), its language model's logits
after it, and its greedy caption (`language_model.generate(inputs_embeds=[soft prompt | BOS],
eos_token_id="\\n")`, what BLIP-2 does inside), with a "\\n" that really ends the caption early.

The same weights written out under LAVIS `blip2_opt` names (`Qformer.*`, `query_tokens`,
`ln_vision.*`, `opt_proj.*`, and `visual_encoder.*` as AU-BLIP / Exp-BLIP ship their fine-tuned ViT)
load with nothing missing or unexpected and give the same soft prompt; `train.py mode=stage
stage=caption` starts from that file and `expvl.load(run).caption` writes captions. Stages 2 and 3 and
VL-FAU train a few steps on a tiny OPT (the loss falls) and generate. The Exp-BLIP recipe builds at
full size on the meta device: OPT-6.7B against transformers' names and shapes, the LAVIS blip2_opt
key set into the Q-Former and llm_proj.
"""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import expvl
from expvl.datamodules.collate import CaptionCollate, InstructCollate, TextConfig, build_instruct_sequences
from expvl.evaluation.answerer import Answerer
from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.convert.blip2_parts import copy_parts, load_qformer_checkpoint
from expvl.models.convert.hf_blip2 import blip2_key_map, qformer_config_from_hf
from expvl.models.convert.lavis import lavis_key_map
from expvl.models.convert.opt import hf_opt_key_map, load_hf_opt, load_opt_state, opt_config_from_hf
from expvl.models.convert.weights import CheckpointError
from expvl.models.generation import GenerationConfig
from expvl.models.opt import OPT
from expvl.models.qformer import QFormer, QFormerConfig
from expvl.models.tokenizer import JSONTokenizer, QFormerTokenizer
from expvl.models.vision import VisionConfig, VisionEncoder
from tests.helpers.eva import EVA_CUSTOM, FFN, HEADS, HF_LAYERS, PATCH, SIZE, WIDTH
from tests.helpers.llm import single_thread, train_steps  # noqa: F401 -- single_thread: one CPU thread for this module
from tests.helpers.stage_parts import parts  # noqa: F401 -- synthesized data and vocab.txt (module fixture)
from tests.models.test_eva_weights import _lavis_names
from tests.models.test_opt import hf_opt_folder, write_opt_tokenizer

transformers = pytest.importorskip("transformers")

Q = 4
VISION = {"hidden_size": WIDTH, "intermediate_size": FFN, "num_hidden_layers": HF_LAYERS, "num_attention_heads": HEADS,
          "image_size": SIZE, "patch_size": PATCH, "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": True}
QFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
           "encoder_hidden_size": WIDTH, "vocab_size": 100, "max_position_embeddings": 64}
OPT_TEXT = {"model_type": "opt", "hidden_size": 48, "ffn_dim": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 512, "word_embed_proj_dim": 48, "bos_token_id": 2, "pad_token_id": 1}
TINY_EVA = VisionConfig(custom=EVA_CUSTOM, image_size=SIZE, layer=-2, transform="blip2")
STEPS = 10  # caption tokens at most


def _face(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(40, 36, 3, generator=g) * 255).to(torch.uint8).numpy())


def _their_greedy(hf, soft_prompt, prompt_ids, eos):
    """transformers' language model, greedy, after [soft prompt | prompt ids] (BLIP-2's generate inside)."""
    embeds = torch.cat([soft_prompt, hf.get_input_embeddings()(prompt_ids)], 1)
    with torch.no_grad():
        return hf.language_model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2],
                                          dtype=torch.long), max_new_tokens=STEPS, do_sample=False, num_beams=1,
                                          eos_token_id=eos, pad_token_id=1)[0].tolist()


def _random_blip2_opt(text: dict, seed: int):
    torch.manual_seed(seed)
    hf = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(
        vision_config=VISION, qformer_config=QFORMER, text_config=text, num_query_tokens=Q)).eval()
    with torch.no_grad():  # HF initialises biases and norms to constants: make every weight count
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for layer in hf.vision_model.encoder.layers:  # EVA has no key bias
            layer.self_attn.qkv.bias[WIDTH:2 * WIDTH] = 0
    return hf


def _end_caption_early(hf, nl: int) -> bool:
    """Swap the "\\n" row with that of a token the free greedy caption of `_face(0)` writes after a few
    steps, so that the caption now ends there; False when this model's caption offers no such token."""
    with torch.no_grad():
        pixels = VisionEncoder(TINY_EVA).eval_transform(_face(0))[None]
        free = _their_greedy(hf, hf.get_image_features(pixel_values=pixels).pooler_output, torch.tensor([[2]]), None)
        t = next((t for t in range(2, STEPS - 2) if free[t] > 3 and free[t] not in free[:t] and nl not in free[:t + 1]),
                 None)
        if t is None:
            return False
        emb = hf.get_input_embeddings().weight  # the head is tied to it: logits swap with the rows
        assert hf.language_model.lm_head.weight.data_ptr() == emb.data_ptr()
        emb[[nl, free[t]]] = emb[[free[t], nl]]
    return True


def _blip2_opt_folder(folder, *, extra_rows=0, end_early=True):
    """A tiny transformers Blip2 with an OPT language model, as the hub's BLIP-2 OPT folders are laid out,
    its tokenizer beside it; with `end_early`, "\\n" is made to end the caption of `_face(0)` early (two
    vocabulary rows swapped), so that stopping there is tested. Returns (hf, newline id)."""
    write_opt_tokenizer(folder)
    tok = JSONTokenizer(folder / "tokenizer.json")
    nl = tok.encode("\n", bos=False)[0]
    text = OPT_TEXT | {"vocab_size": tok.vocab_size + extra_rows, "eos_token_id": nl}
    for seed in range(20):
        hf = _random_blip2_opt(text, seed)
        if not end_early or _end_caption_early(hf, nl):
            break
    else:
        raise AssertionError("no seed gave a caption that a swapped row can end early")
    hf.save_pretrained(folder)
    return hf, nl


@pytest.fixture(scope="module")
def blip2_opt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip2-opt")
    hf, nl = _blip2_opt_folder(folder)
    return hf, folder, nl


def test_a_blip2_opt_folder_gives_transformers_soft_prompt_logits_and_caption(blip2_opt):
    hf, folder, nl = blip2_opt
    model = expvl.load(folder, vision=TINY_EVA)
    run = model.run
    assert isinstance(run.llm, OPT) and run.text.caption_eos == "\n" and run.trains("caption")
    tok = model.tokenizers["llm"]
    pixels = torch.stack([model.transform(_face(s)) for s in (0, 1)])
    blip2 = run.stage_model("caption")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, tok.vocab_size, (2, 6), generator=g)
    ids[:, 0] = tok.bos_id
    mask = torch.tensor([[1] * 6, [0, 0] + [1] * 4])  # [soft prompt | left padding | BOS text], as generation lays it out
    with torch.no_grad():
        theirs = hf.get_image_features(pixel_values=pixels).pooler_output
        prompt = blip2.soft_prompt(blip2.encode_image(pixels))
        torch.testing.assert_close(prompt, theirs, rtol=1e-4, atol=1e-5)
        embeds, full_mask = blip2.llm.prefixed(theirs, ids, mask)
        their_logits = hf.language_model(inputs_embeds=embeds, attention_mask=full_mask).logits
        our_logits = blip2.llm(inputs_embeds=embeds, attention_mask=full_mask)["logits"]
    real = full_mask.bool()
    diff = float((our_logits - their_logits)[real].abs().max())
    print(f"BLIP-2 OPT: max |logit difference| after the soft prompt: {diff:.2e}")
    assert diff < 1e-4
    for seed in (0, 1):
        with torch.no_grad():
            soft = hf.get_image_features(pixel_values=model.transform(_face(seed))[None]).pooler_output
        theirs_ids = _their_greedy(hf, soft, torch.tensor([[tok.bos_id]]), hf.config.text_config.eos_token_id)
        assert model.caption(_face(seed), max_new_tokens=STEPS) == tok.decode(theirs_ids).strip()
        if seed == 0:  # the swapped rows: "\n" ends this caption before max_new_tokens
            assert theirs_ids[-1] == nl and len(theirs_ids) < STEPS
    assert isinstance(model.ask(_face(1), "Is the inner brow raised?", max_new_tokens=4), str)


def test_a_decoder_with_more_rows_than_its_tokenizer_is_not_resized(tmp_path):
    """OPT pads 50265 tokens to 50272 embedding rows: the folder loads as it is, nothing grown or refused."""
    hf, _ = _blip2_opt_folder(tmp_path, extra_rows=5, end_early=False)
    run = expvl.load(tmp_path, vision=TINY_EVA).run
    assert run.llm.config.vocab_size == run.tokenizers["llm"].vocab_size + 5 == hf.config.text_config.vocab_size


# ---- LAVIS blip2_opt checkpoints (BLIP-2 OPT, AU-BLIP / Exp-BLIP releases) ---------------------------------


def _qformer_config(folder) -> QFormerConfig:
    return replace(qformer_config_from_hf(json.loads((folder / "config.json").read_text())), text_input=False)


def _as_lavis_blip2_opt(hf, qcfg: QFormerConfig) -> dict[str, torch.Tensor]:
    """The transformers weights under LAVIS blip2_opt's names, the ViT included (`visual_encoder.*`), the OPT
    not (LAVIS checkpoints leave the frozen LLM out)."""
    state = hf.state_dict()
    out = _lavis_names({k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")})
    with torch.device("meta"):
        lavis = lavis_key_map(QFormer(qcfg))  # ours -> LAVIS
    out |= {lavis[ours]: state[theirs] for ours, theirs in blip2_key_map(qcfg).items()}
    out["Qformer.bert.embeddings.position_ids"] = torch.arange(qcfg.max_position_embeddings)[None]
    out |= {f"opt_proj.{p}": state[f"language_projection.{p}"] for p in ("weight", "bias")}
    return {k: v.detach().clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def lavis_checkpoint(blip2_opt, tmp_path_factory):
    hf, folder, _ = blip2_opt
    path = tmp_path_factory.mktemp("lavis") / "expblip_opt.pth"
    torch.save({"model": _as_lavis_blip2_opt(hf, _qformer_config(folder))}, path)
    return path


def test_a_lavis_blip2_opt_checkpoint_loads_whole_and_gives_the_same_soft_prompt(blip2_opt, lavis_checkpoint):
    hf, folder, _ = blip2_opt
    vision = VisionEncoder(replace(TINY_EVA, pretrained=str(lavis_checkpoint)))  # its visual_encoder.*, strictly
    llm = load_hf_opt(folder)  # the OPT is not in the checkpoint: BLIP-2 loads it from its own folder
    model = Blip2(Blip2Config(stage="caption", vision=vision.config, qformer=_qformer_config(folder), llm=llm.config),
                  vision=vision, llm=llm).eval()
    found = load_qformer_checkpoint(model.qformer, lavis_checkpoint, "lavis")  # strict: nothing missing or extra
    assert set(found) == {"ln_vision.weight", "ln_vision.bias", "llm_proj.weight", "llm_proj.bias"}
    copy_parts(model, found, lavis_checkpoint, required=tuple(found))
    pixels = torch.stack([vision.eval_transform(_face(s)) for s in (2, 3)])
    with torch.no_grad():
        torch.testing.assert_close(model.soft_prompt(model.encode_image(pixels)),
                                   hf.get_image_features(pixel_values=pixels).pooler_output, rtol=1e-4, atol=1e-5)
    state = torch.load(lavis_checkpoint, weights_only=True)["model"]
    del state["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
    with pytest.raises(CheckpointError, match=r"layer\.1\.output_query\.dense\.bias"):
        load_qformer_checkpoint(model.qformer, state, "lavis")


def test_train_py_stage2_starts_from_a_lavis_blip2_opt_checkpoint_and_captions(parts, blip2_opt, lavis_checkpoint,  # noqa: F811
                                                                                tmp_path):
    """`train.py mode=stage stage=caption` as the Exp-BLIP recipe runs it, at toy size: the ViT (fine-tuned) and
    the Q-Former, ln_vision and opt_proj from one LAVIS blip2_opt file, the OPT and its tokenizer from a
    folder, BLIP-2 OPT's "\\n" caption end; then `expvl.load(run).caption` on the finished run."""
    from train import main

    _, folder, nl = blip2_opt
    q = _qformer_config(folder)
    layers = {"model": {"vision": {"custom": EVA_CUSTOM, "image_size": SIZE, "layer": -2, "transform": "blip2",
                                   "pretrained": str(lavis_checkpoint), "freeze": False, "precision": "fp32"},
                        "qformer": {"hidden_size": q.hidden_size, "num_layers": q.num_layers, "num_heads": q.num_heads,
                                    "intermediate_size": q.intermediate_size, "num_query_tokens": q.num_query_tokens,
                                    "max_position_embeddings": q.max_position_embeddings,
                                    "cross_attention_freq": q.cross_attention_freq}},
              "text": {"caption_eos": "\n"}}
    no_conv = tmp_path / "no_conv.yaml"  # drop the tiny config's conv tower first, so the dicts do not merge
    no_conv.write_text(json.dumps({"model": {"vision": {"custom": None}}}))
    recipe = tmp_path / "expblip_tiny.yaml"
    recipe.write_text(json.dumps(layers))  # JSON is YAML: "\n" stays a newline
    run_dir = tmp_path / "run"
    out = main(["--config", "tiny", "--config", str(no_conv), "--config", str(recipe), "mode=stage", "stage=caption",
                f"run_dir={run_dir}", f"data.root={parts['data']}", f"pretrained.qformer_vocab={parts['vocab']}",
                f"pretrained.llm={folder}", f"pretrained.llm_tokenizer={folder / 'tokenizer.json'}",
                f"pretrained.lavis_checkpoint={lavis_checkpoint}", "pretrained.llm_dtype=fp32",
                "trainer.progress_bar=false", "stage2.max_steps=2", "stage2.batch_size=4"])
    ck = torch.load(out["checkpoint"], map_location="cpu", weights_only=True)
    assert ck["stage"] == "caption" and ck["global_step"] == 2
    keys = ck["state_dict"]
    assert "model.llm_proj.weight" in keys and any(k.startswith("model.vision.") for k in keys)  # the ViT trained
    assert not any(k.startswith("model.llm.") for k in keys)  # the OPT stayed frozen, out of the checkpoint
    model = expvl.load(run_dir)
    assert model.run.text.caption_eos == "\n" and isinstance(model.run.llm, OPT)
    captions = model.caption([_face(0), _face(1)], max_new_tokens=6)
    assert len(captions) == 2 and all(isinstance(c, str) and "\n" not in c for c in captions)


# ---- stages 2 and 3 and VL-FAU with an OPT decoder ------------------------------------------------------------


CAPTIONS = ["The face shows happiness.", "The person is frowning.", "It is a people who raises upper lip.",
            "The face shows anger."]
PAIRS = [("is the brow raised?", "yes"), ("is the lip pressed?", "no"), ("is the brow raised?", "no"),
         ("is the lip pressed?", "yes")]
PROMPT = "Question: {} Answer:"


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    """A tiny OPT folder and its OPT-style tokenizer (one id per embedding row), the decoder first trained as
    a plain causal LM on the captions ("\\n"-ended) and the question / answer texts, as a pretrained LLM
    knows its language: the stages then only have to steer it through the soft prompt."""
    folder = write_opt_tokenizer(tmp_path_factory.mktemp("tiny-opt"))
    tok = JSONTokenizer(folder / "tokenizer.json")
    hf_opt_folder(folder, vocab_size=tok.vocab_size, hidden_size=48, ffn_dim=96)
    llm = load_hf_opt(folder)
    captions = tok.batch_encode([c + "\n" for c in CAPTIONS], bos=True)
    qa = build_instruct_sequences(tok, [PROMPT.format(q) for q, _ in PAIRS], [a for _, a in PAIRS],
                                  max_input_len=64, max_output_len=8)
    texts = [(captions["input_ids"], captions["attention_mask"]), (qa["llm_ids"], qa["llm_mask"])]
    opt = torch.optim.AdamW(llm.parameters(), lr=3e-3)
    no_prompt = torch.zeros(4, 0, llm.config.dim)
    for _ in range(150):
        loss = sum(llm.prefixed_loss(no_prompt, ids, mask, ids.masked_fill(mask == 0, -100)) for ids, mask in texts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5
    save_file({k: v.detach().contiguous() for k, v in _hf_names(llm).items()}, folder / "model.safetensors")
    return folder, tok


def _hf_names(llm: OPT) -> dict[str, torch.Tensor]:
    """Our OPT's weights under transformers' names (the inverse of the converter's map)."""
    ours = llm.state_dict()
    return {theirs: ours[key] for key, theirs in hf_opt_key_map(llm.config).items()}


def _features(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model.vision(torch.randn(n, 3, model.vision.config.image_size, model.vision.config.image_size,
                                        generator=g))


def test_stage2_captioning_trains_and_writes_captions_with_an_opt_decoder(tiny_opt):
    folder, tok = tiny_opt
    llm = load_hf_opt(folder)
    model = Blip2(Blip2Config(stage="caption", llm=llm.config), llm=llm)
    assert model.llm_proj.out_features == llm.config.dim == 48
    text = TextConfig(caption_eos="\n")
    feats = _features(model, 4, seed=0)
    batch = CaptionCollate(tok, text)([{"record": None, "sample": {"text": c}, "image": torch.zeros(1), "_pos": None}
                                       for c in CAPTIONS])
    nl = tok.encode("\n", bos=False)[0]
    assert all(row[m.bool()][-1] == nl for row, m in zip(batch["llm_ids"], batch["llm_mask"]))

    def step():
        return model.lm_loss(model.embed_features(feats), batch["llm_ids"], batch["llm_mask"], batch["labels"])["loss"]

    first, last = train_steps(model, step)
    assert last < 0.4 * first, (first, last)
    with torch.no_grad():
        embeds = model.embed_features(feats)
        written = Answerer(model, {"llm": tok}, text).caption(embeds, max_new_tokens=24)
        ids = model.generate(embeds, torch.full((4, 1), tok.bos_id), torch.ones(4, 1, dtype=torch.long),
                             GenerationConfig(max_new_tokens=24, eos_token_id=nl, pad_token_id=tok.pad_id))
    assert len(written) == 4 and all(w and "\n" not in w for w in written), written
    ended = [row.tolist().index(nl) for row in ids if nl in row.tolist()]
    assert ended and all(i > 0 for i in ended)  # some captions end at "\n", after some words


def test_stage3_instructions_train_and_answer_with_an_opt_decoder(tiny_opt, tmp_path):
    folder, tok = tiny_opt
    words = ["is", "the", "brow", "raised", "lip", "pressed", "yes", "no", "?"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    qtok = QFormerTokenizer.from_bert_vocab(tmp_path / "vocab.txt")
    llm = load_hf_opt(folder)
    qformer = QFormerConfig.from_name("tiny", vocab_size=qtok.vocab_size, pad_token_id=qtok.pad_id,
                                      hidden_dropout=0.0, attention_dropout=0.0)
    model = Blip2(Blip2Config(stage="instruct", qformer=qformer, llm=llm.config), llm=llm)
    text = TextConfig(prompt_template=PROMPT)
    pairs = PAIRS
    feats = _features(model, 4, seed=1)
    batch = InstructCollate(qtok, tok, text)([{"record": None, "sample": {"question": q, "answer": a},
                                               "image": torch.zeros(1), "_pos": None} for q, a in pairs])

    def step():
        return model.lm_loss(model.embed_features(feats), batch["llm_ids"], batch["llm_mask"], batch["labels"],
                             instruction_ids=batch["qf_ids"], instruction_mask=batch["qf_mask"])["loss"]

    first, last = train_steps(model, step)
    assert last < 0.5 * first, (first, last)
    answerer = Answerer(model, {"llm": tok, "qformer": qtok}, text)
    with torch.no_grad():
        embeds = model.embed_features(feats)
        answers = answerer.generate(embeds, [q for q, _ in pairs], max_new_tokens=4)
        margins = answerer.score_yes_no(embeds, [q for q, _ in pairs])
    assert all(a in ("yes", "no") for a in answers), answers  # the answer, then </s>: generation stopped
    assert margins.shape == (4,) and bool(torch.isfinite(margins).all())


def test_vlfau_trains_and_explains_with_an_opt_decoder(tiny_opt):
    from expvl.datamodules.vlfau import VLFAUCollate
    from expvl.models.vlfau import VLFAU, VLFAUConfig
    from tests.training.test_vlfau import AUS, make_data
    from tests.training.test_vlfau import WIDTH as FEATURES

    folder, tok = tiny_opt
    llm = load_hf_opt(folder)
    cfg = VLFAUConfig(aus=AUS, vision=None, feature_width=FEATURES, llm=llm.config, max_global_len=48,
                      qformer=QFormerConfig.from_name("tiny", num_query_tokens=2, hidden_dropout=0.0,
                                                      attention_dropout=0.0),
                      local_max_new_tokens=12, global_max_new_tokens=16)
    model = VLFAU(cfg, llm=llm)
    feats, records = make_data(16, seed=3)
    batch = VLFAUCollate(tok, cfg).encode(records)
    lang = {k: batch[k] for k in batch if k.startswith(("local_", "global_")) and "texts" not in k}

    def step():
        return model.losses(model.embed_features(feats), batch["aus"], batch["au_mask"], **lang)["loss"]

    first, last = train_steps(model, step, steps=30)
    assert last < 0.7 * first, (first, last)
    with torch.no_grad():
        out = model.explain(model.embed_features(feats[:4]), tok)
    assert len(out) == 4 and all(isinstance(e.global_text, str) and set(e.probs) == set(AUS) for e in out)


# ---- Exp-BLIP as published, at full size on the meta device ------------------------------------------------


def test_the_expblip_recipe_builds_opt_6_7b_and_takes_the_lavis_blip2_opt_keys_on_meta(tmp_path, monkeypatch):
    """configs/recipes/expblip_opt67b.yaml: EVA ViT-g + BLIP-2 Q-Former + OPT-6.7B at full size, no memory.
    Our OPT-6.7B has exactly transformers' OPTForCausalLM names and shapes through the map (nothing missing,
    nothing unexpected), and LAVIS blip2_opt's Q-Former / query_tokens / ln_vision / opt_proj keys (the ViT
    and OPT beside them) load strictly into the stage-2 model."""
    from expvl.configs import CONFIG_DIR, load_config
    from expvl.configs.schema import RunConfig
    from expvl.training.stages import blip2_config
    from tests.models.test_convert_qformer import lavis_keys

    env = {"OPT_DIR": tmp_path / "opt-6.7b", "OPT_TOKENIZER": tmp_path / "opt-6.7b" / "tokenizer.json",
           "EXPBLIP_LAVIS": tmp_path / "expblip.pth", "EVA_VIT_G": tmp_path / "expblip.pth",
           "BERT_VOCAB": tmp_path / "vocab.txt", "DATA_ROOT": tmp_path / "data"}
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    recipes = CONFIG_DIR / "recipes"
    cfg = load_config(RunConfig, [recipes / "_blip2_vitg.yaml", recipes / "expblip_opt67b.yaml"])
    assert (cfg.mode, cfg.stage, cfg.text.caption_eos, cfg.stage2.captions) == ("stage", "caption", "\n", ["fused"])
    assert cfg.pretrained.llm == str(env["OPT_DIR"]) and cfg.pretrained.lavis_checkpoint == str(env["EXPBLIP_LAVIS"])
    o, v = cfg.stage2.optim, cfg.model.vision
    assert (o.lr, o.min_lr, o.warmup_steps, o.weight_decay, o.vit_layer_decay) == (1e-5, 0.0, 1000, 0.05, 0.95)
    assert (v.freeze, v.precision, v.image_size, v.layer, cfg.stage2.batch_size * cfg.trainer.devices) == (
        False, "fp32", 224, -2, 32)

    opt_json = transformers.OPTConfig(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32,
                                      word_embed_proj_dim=4096, vocab_size=50272, max_position_embeddings=2048)
    with torch.device("meta"):
        theirs = transformers.OPTForCausalLM(opt_json).state_dict()
        llm = OPT(opt_config_from_hf(opt_json.to_dict()))
    assert set(hf_opt_key_map(llm.config).values()) == set(theirs) - {"lm_head.weight"}  # the head is tied
    load_opt_state(llm, theirs, what="meta OPT-6.7B")  # strict: names and shapes
    assert 6.6e9 < sum(p.numel() for p in llm.parameters()) < 6.7e9  # "6.7B", the tied head counted once

    vision = VisionEncoder(replace(cfg.model.vision, pretrained=""), device="meta")
    qtok = SimpleNamespace(vocab_size=30523, pad_id=0)
    with torch.device("meta"):
        model = Blip2(blip2_config(cfg, "caption", {"qformer": qtok}, llm), vision=vision, llm=llm)
    assert model.llm_proj.weight.shape == (4096, 768) and not model.qformer.cfg.text_input
    shapes = lavis_keys(text=False, cls=False) | {"ln_vision.weight": (1408,), "ln_vision.bias": (1408,),
                                                  "opt_proj.weight": (4096, 768), "opt_proj.bias": (4096,),
                                                  "visual_encoder.cls_token": (1, 1, 1408)}
    source = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    found = load_qformer_checkpoint(model.qformer, source, "lavis")
    assert set(found) == {"ln_vision.weight", "ln_vision.bias", "llm_proj.weight", "llm_proj.bias"}
    copy_parts(model, found, "meta blip2_opt", required=tuple(found))  # shapes of ln_vision and llm_proj fit
