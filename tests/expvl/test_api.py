"""The Python API (expvl/api.py): the README's example as written, batching, and transformers folders.

A tiny pipeline run (train.py --config tiny) is the run folder; for transformers folders the oracle is
transformers itself: a tiny random InstructBlip / Blip2 saved with `save_pretrained`, with tokenizer
files written beside it, must generate through `expvl.load` exactly the tokens transformers' own
language model generates after its own soft prompt.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import expvl
from expvl.evaluation.answerer import Answerer
from expvl.models.vision import VisionConfig
from tests.conftest import REPO
from tests.helpers.eva import EVA_CUSTOM, FFN, HEADS, HF_LAYERS, PATCH, SIZE, WIDTH


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("api") / "tiny"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "LOCAL_RANK", "RANK", "WORLD"))}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", "tiny", f"run_dir={run_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def faces(tiny_run):
    return sorted((tiny_run / "data" / "render" / "images" / "test").glob("*.png"))[:3]


def _readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## The Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tiny_run, faces, tmp_path, monkeypatch):
    code = _readme_example()
    assert code.count("\n") <= 6 and "expvl.load(" in code
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "default").symlink_to(tiny_run)
    Image.open(faces[0]).save(tmp_path / "face.jpg")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    one, several = out.getvalue().splitlines()
    assert several.startswith("[") and several.count("'") + several.count('"') >= 4  # a list of two answers
    assert one == expvl.load(tiny_run).ask(str(tmp_path / "face.jpg"), "Are the inner brows raised?")


def test_an_image_is_encoded_once_and_batching_changes_no_answer(tiny_run, faces):
    model = expvl.load(tiny_run)
    questions = ["Are the lip corners pulled up?", "Are the inner brows raised?", "Which emotion does this face show?"]
    seen = []
    encoder = model.run.encoder
    hook = encoder.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[0]))
    try:
        batched = model.ask(faces[0], questions, max_new_tokens=6)
    finally:
        hook.remove()
    assert seen == [1]  # three questions, one pass through the encoder
    assert batched == [model.ask(faces[0], q, max_new_tokens=6) for q in questions]
    assert model.ask(faces, questions[2], max_new_tokens=6) == [model.ask(f, questions[2], max_new_tokens=6)
                                                                for f in faces]
    assert model.ask(faces, questions, max_new_tokens=6) == [model.ask(f, q, max_new_tokens=6)
                                                             for f, q in zip(faces, questions)]
    pil = Image.open(faces[1])
    assert model.ask(pil, questions[0]) == model.ask(faces[1], questions[0])


def test_yes_probability_is_the_margin_evaluation_decides_by(tiny_run, faces):
    model = expvl.load(tiny_run)
    run = model.run
    answerer = Answerer(run.stage_model("instruct"), run.tokenizers, run.cfg.text, run.device)
    question = "Are the lip corners pulled up?"
    pixels = run.encoder.eval_transform(Image.open(faces[0]).convert("RGB"))[None]
    margin = answerer.score_yes_no(answerer.model.encode_image(pixels), [question])
    assert model.yes_probability(faces[0], question) == pytest.approx(torch.sigmoid(margin).item(), abs=1e-6)
    p = model.yes_probability(faces, question)
    assert len(p) == 3 and all(0.0 < x < 1.0 for x in p)


def test_captions_and_refusals(tiny_run, faces, tmp_path):
    model = expvl.load(tiny_run)
    assert isinstance(model.caption(faces[0]), str) and len(model.caption(faces)) == 3
    with pytest.raises(ValueError, match="2 images and 3 questions"):
        model.ask(faces[:2], ["a?", "b?", "c?"])
    with pytest.raises(ValueError, match="empty question"):
        model.ask(faces[0], "  ")
    with pytest.raises(TypeError, match="a question is a string .*got int 5"):
        model.ask(faces[0], 5)
    with pytest.raises(TypeError, match="got NoneType None"):
        model.ask(faces[0], ["Are the inner brows raised?", None])
    with pytest.raises(ValueError, match="not a VL-FAU run"):
        model.explain(faces[0])
    with pytest.raises(OSError, match="missing.png"):
        model.ask(tmp_path / "missing.png", "Are the inner brows raised?")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        expvl.load(tmp_path)


# ---- a transformers InstructBlip / Blip2 folder -----------------------------------------------------

transformers = pytest.importorskip("transformers")

Q, QF_VOCAB, LLM_VOCAB = 4, 100, 120
VISION = {"hidden_size": WIDTH, "intermediate_size": FFN, "num_hidden_layers": HF_LAYERS, "num_attention_heads": HEADS,
          "image_size": SIZE, "patch_size": PATCH, "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": True}
QFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
           "encoder_hidden_size": WIDTH, "vocab_size": QF_VOCAB, "max_position_embeddings": 64}
TEXT = {"model_type": "llama", "vocab_size": LLM_VOCAB, "hidden_size": 48, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
WORDS = ["are", "is", "the", "inner", "brows", "raised", "lip", "corners", "pulled", "up", "yes", "no", "face"]
TINY_EVA = VisionConfig(custom=EVA_CUSTOM, image_size=SIZE, layer=-2, transform="blip2")


def _write_tokenizers(folder):
    """A word-level tokenizer.json with the LLM's 120 ids (so every generated id decodes) and specials in
    tokenizer_config.json, and a BERT vocab.txt for the Q-Former (its [DEC] row appended on load)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = ["<unk>", "<s>", "</s>", "<pad>", *WORDS]
    vocab += [f"w{i}" for i in range(LLM_VOCAB - len(vocab))]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "pad_token": "<pad>"}))
    bert = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    bert += [f"q{i}" for i in range(QF_VOCAB - 1 - len(bert))]
    (folder / "qformer_tokenizer").mkdir()
    (folder / "qformer_tokenizer" / "vocab.txt").write_text("\n".join(bert) + "\n")


def _folder(tmp_path, kind: str):
    config_cls, model_cls = {"instructblip": (transformers.InstructBlipConfig,
                                              transformers.InstructBlipForConditionalGeneration),
                             "blip2": (transformers.Blip2Config, transformers.Blip2ForConditionalGeneration)}[kind]
    torch.manual_seed(0)
    hf = model_cls(config_cls(vision_config=VISION, qformer_config=QFORMER, text_config=TEXT,
                              num_query_tokens=Q)).eval()
    with torch.no_grad():  # HF initialises biases and norms to constants: make every weight count
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for layer in hf.vision_model.encoder.layers:  # EVA has no key bias
            layer.self_attn.qkv.bias[WIDTH:2 * WIDTH] = 0
    folder = tmp_path / kind
    hf.save_pretrained(folder)
    _write_tokenizers(folder)
    return hf, folder


def _their_greedy(hf, soft_prompt, prompt_ids, steps):
    """transformers' language model, greedy, after the given soft prompt and prompt ids."""
    embeds = torch.cat([soft_prompt, hf.get_input_embeddings()(prompt_ids)], 1)
    out = hf.language_model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                     max_new_tokens=steps, do_sample=False, num_beams=1, eos_token_id=2,
                                     pad_token_id=3)
    return out[0]


def test_an_instructblip_folder_answers_as_transformers_generates(tmp_path, faces):
    hf, folder = _folder(tmp_path, "instructblip")
    model = expvl.load(folder, vision=TINY_EVA)
    assert model.run.trains("instruct") and not model.run.trains("caption")
    question = "are the inner brows raised"
    pixels = model.transform(Image.open(faces[0]).convert("RGB"))[None]
    qf = model.tokenizers["qformer"].batch_encode([question], max_length=128)
    llm = model.tokenizers["llm"]
    with torch.no_grad():
        prompt = hf.get_image_features(pixel_values=pixels, qformer_input_ids=qf["input_ids"],
                                       qformer_attention_mask=qf["attention_mask"]).pooler_output
        theirs = _their_greedy(hf, prompt, torch.tensor([llm.encode(question, bos=True)]), 6)
    assert model.ask(faces[0], question, max_new_tokens=6) == llm.decode(theirs).strip()
    assert 0.0 < model.yes_probability(faces[0], question) < 1.0
    with pytest.raises(ValueError, match=r"no .caption. model to caption with \(it trained \[.instruct.\]\)"):
        model.caption(faces[0])


def test_a_blip2_folder_captions_as_transformers_generates(tmp_path, faces):
    hf, folder = _folder(tmp_path, "blip2")
    model = expvl.load(folder, vision=TINY_EVA)
    pixels = model.transform(Image.open(faces[0]).convert("RGB"))[None]
    with torch.no_grad():
        prompt = hf.get_image_features(pixel_values=pixels).pooler_output
        theirs = _their_greedy(hf, prompt, torch.tensor([[1]]), 5)  # BOS alone: BLIP-2's captioning
    assert model.caption(faces[0], max_new_tokens=5) == model.tokenizers["llm"].decode(theirs).strip()
    assert isinstance(model.ask(faces[0], "is the face raised"), str)  # through "Question: {} Answer:"


def test_a_folder_with_another_tower_needs_its_vision_config(tmp_path):
    _, folder = _folder(tmp_path, "blip2")
    with pytest.raises(ValueError, match="is not EVA ViT-g/14.*pass vision="):
        expvl.load(folder)
