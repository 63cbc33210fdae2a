"""VL-FAU (models/vlfau.py, models/lit_vlfau.py): gradients, loss ablations, freeze table, checkpoints,
collation, recipe configs, and explanations of a tiny model trained here on cached synthetic tokens."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from expvl.configs import ConfigError, load_config
from expvl.configs.schema import VLFAURecipe
from expvl.datamodules.vlfau import VLFAUCollate, vlfau_samples
from expvl.models.llm import LLMConfig
from expvl.models.optim import OptimConfig, build_optimizer
from expvl.models.qformer import QFormerConfig
from expvl.models.tokenizer import SPTokenizer
from expvl.models.vision import VisionConfig
from expvl.models.vlfau import VLFAU, VLFAUConfig, au_pos_weight, dice, local_description
from expvl.synthesis.readers.folds import PROTOCOLS
from expvl.synthesis.text_rules import PARAPHRASES, join_list
from expvl.training.lit_base import freeze
from expvl.training.lit_vlfau import LitVLFAU, trainable_prefixes
from expvl.vocab.facs import DATASET_AUS, SYNTHFACS_AUS
from expvl.vocab.phrases import find_aus
from expvl.vocab.records import Record

REPO = Path(__file__).resolve().parents[2]
AUS = ["AU1", "AU4", "AU12", "AU25"]
N_TOKENS, WIDTH = 4, 16  # cached image tokens per face and their width


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matmuls on a shared 2-core machine: two intra-op threads spin against each other (~10x slower)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def global_text(active: list[str]) -> str:
    if not active:
        return "The face is relaxed."
    return "The person " + join_list([PARAPHRASES[a]["vp"][0].format(adv="") for a in active]) + "."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SPTokenizer:
    texts = [local_description(a, i) for a in AUS for i in (None, 1.0, 3.0, 4.5)]
    rng = random.Random(0)
    for _ in range(60):
        texts.append(global_text([a for a in AUS if rng.random() < 0.5]))
    return SPTokenizer.train(texts, tmp_path_factory.mktemp("tok") / "sp.model", vocab_size=400)


def tiny_cfg(tok: SPTokenizer, **kw) -> VLFAUConfig:
    return VLFAUConfig(
        aus=AUS, vision=None, feature_width=WIDTH,
        qformer=QFormerConfig.from_name("tiny", num_query_tokens=2, hidden_dropout=0.0, attention_dropout=0.0),
        llm=LLMConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                      tie_embeddings=True, attn_backend="math"),
        max_global_len=48, local_max_new_tokens=16, global_max_new_tokens=32, **kw)


def make_data(n: int, seed: int) -> tuple[torch.Tensor, list[Record]]:
    """Cached tokens whose AU is visible as a fixed pattern on that AU's token, and matching records."""
    g = torch.Generator().manual_seed(1234)
    patterns = torch.randn(len(AUS), WIDTH, generator=g)
    patterns = 3.0 * patterns / patterns.norm(dim=-1, keepdim=True)
    g.manual_seed(seed)
    labels = (torch.rand(n, len(AUS), generator=g) < 0.4).float()
    feats = 0.3 * torch.randn(n, N_TOKENS, WIDTH, generator=g)
    feats[:, :len(AUS)] += labels[:, :, None] * patterns[None]
    records = []
    for i in range(n):
        aus = {a: int(labels[i, k]) for k, a in enumerate(AUS)}
        active = [a for a in AUS if aus[a]]
        records.append(Record(id=f"t/{seed}/{i}", image="x.png", source="test", split="train", aus=aus,
                              captions={"au_rule": global_text(active)}))
    return feats, records


def language_params(model):
    return [p for n, p in model.named_parameters() if n.startswith("llm_proj.")]


def test_gradients_reach_au_queries_and_head(tokenizer):
    model = VLFAU(tiny_cfg(tokenizer))
    counts = freeze(model, trainable_prefixes(model))
    assert counts["trainable"] < counts["total"]  # the LLM is frozen by default
    feats, records = make_data(6, seed=1)
    batch = VLFAUCollate(tokenizer, model.cfg).encode(records)
    out = model.losses(model.embed_features(feats), batch["aus"], batch["au_mask"],
                       **{k: batch[k] for k in batch if k.startswith(("local_", "global_")) and "texts" not in k})
    out["loss"].backward()
    for name in ("au.query_tokens", "au.classifier_weight", "au.classifier_bias", "qformer.query_tokens",
                 "llm_proj.weight", "ln_vision.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    for name, p in model.named_parameters():  # every trainable parameter gets a gradient, no other one
        assert (p.grad is not None) == p.requires_grad, name
    assert not any(n.startswith("llm.") for n, p in model.named_parameters() if p.requires_grad)


def test_language_weights_zero_leave_only_bce(tokenizer):
    feats, records = make_data(6, seed=2)
    torch.manual_seed(0)
    full = VLFAU(tiny_cfg(tokenizer))
    ablated = VLFAU(tiny_cfg(tokenizer, local_weight=0.0, global_weight=0.0))
    ablated.load_state_dict(full.state_dict())
    for m in (full, ablated):
        freeze(m, trainable_prefixes(m))
    batch = VLFAUCollate(tokenizer, full.cfg).encode(records)
    lang = {k: batch[k] for k in batch if k.startswith(("local_", "global_")) and "texts" not in k}
    out_full = full.losses(full.embed_features(feats), batch["aus"], batch["au_mask"], **lang)
    out_abl = ablated.losses(ablated.embed_features(feats), batch["aus"], batch["au_mask"])  # no text needed
    assert set(out_abl) == {"loss", "loss_au", "logits"}
    assert torch.equal(out_abl["loss"], out_abl["loss_au"])
    assert torch.equal(out_abl["loss_au"], out_full["loss_au"])  # same BCE, language only adds terms
    assert out_full["loss"] > out_full["loss_au"] + 1.0
    out_abl["loss"].backward()
    assert all(p.grad is None for p in language_params(ablated))
    assert "llm_proj." not in trainable_prefixes(ablated) and not any(p.requires_grad for p in language_params(ablated))
    # the BCE gradient of the classifier is the same; the AU queries additionally learn from language
    out_bce_only = full.losses(full.embed_features(feats), batch["aus"], batch["au_mask"], **lang)["loss_au"]
    g_bce = torch.autograd.grad(out_bce_only, [full.au.classifier_weight, full.au.query_tokens])
    torch.testing.assert_close(ablated.au.classifier_weight.grad, g_bce[0])
    torch.testing.assert_close(ablated.au.query_tokens.grad, g_bce[1])
    g_full = torch.autograd.grad(out_full["loss"], full.au.query_tokens)[0]
    assert not torch.allclose(g_full, g_bce[1])


def test_each_language_loss_switches_off_alone(tokenizer):
    feats, records = make_data(4, seed=3)
    torch.manual_seed(0)
    for local_w, global_w, keys in ((0.0, 0.5, {"loss_global"}), (2.0, 0.0, {"loss_local"})):
        model = VLFAU(tiny_cfg(tokenizer, local_weight=local_w, global_weight=global_w))
        batch = VLFAUCollate(tokenizer, model.cfg).encode(records)
        assert ("global_ids" in batch) == (global_w > 0)
        lang = {k: batch[k] for k in batch if k.startswith(("local_", "global_")) and "texts" not in k}
        out = model.losses(model.embed_features(feats), batch["aus"], batch["au_mask"], **lang)
        assert {k for k in out if k.startswith("loss_")} == {"loss_au"} | keys
        (k,) = keys
        torch.testing.assert_close(out["loss"], out["loss_au"] + (local_w or global_w) * out[k])


class _PatchEncoder(torch.nn.Module):
    """Stands in for models.vision.VisionEncoder (building open_clip towers costs ~10 s here)."""

    def __init__(self, freeze: bool):
        super().__init__()
        self.config = VisionConfig.from_name("tiny-conv", freeze=freeze)
        self.width = WIDTH
        self.proj = torch.nn.Conv2d(3, WIDTH, kernel_size=8, stride=8)

    def forward(self, images):  # (B, 3, 16, 16) -> (B, 4, WIDTH)
        return self.proj(images).flatten(2).transpose(1, 2)


def test_image_path_and_freeze_table(tokenizer):
    for frozen in (True, False):
        cfg = replace(tiny_cfg(tokenizer, train_language_model=not frozen), vision=VisionConfig.from_name("tiny-conv"))
        model = VLFAU(cfg, vision=_PatchEncoder(frozen))
        freeze(model, trainable_prefixes(model))
        prefixes = trainable_prefixes(model)
        assert ("vision." in prefixes) == (not frozen) and ("llm." in prefixes) == (not frozen)
        _, records = make_data(3, seed=7)
        batch = VLFAUCollate(tokenizer, cfg).encode(records)
        lang = {k: batch[k] for k in batch if k.startswith(("local_", "global_")) and "texts" not in k}
        model.losses(model.encode_image(torch.randn(3, 3, 16, 16)), batch["aus"], batch["au_mask"], **lang)["loss"].backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, name


def test_batch_without_positive_aus(tokenizer):
    model = VLFAU(tiny_cfg(tokenizer))
    rec = Record(id="z", image="x.png", source="t", split="train", aus={a: 0 for a in AUS},
                 captions={"au_rule": global_text([])})
    batch = VLFAUCollate(tokenizer, model.cfg).encode([rec, rec])
    assert batch["local_index"].shape == (0, 2)
    lang = {k: batch[k] for k in batch if k.startswith(("local_", "global_")) and "texts" not in k}
    out = model.losses(model.embed_features(torch.randn(2, N_TOKENS, WIDTH)), batch["aus"], batch["au_mask"], **lang)
    assert out["loss_local"].item() == 0.0
    out["loss"].backward()
    assert model.llm_proj.weight.grad is not None  # through the global description


def test_collate_one_local_sentence_per_positive_au(tokenizer):
    cfg = tiny_cfg(tokenizer)
    rec = Record(id="r", image="x.png", source="t", split="train", aus={"AU1": 1, "AU12": 1, "AU4": 0},
                 intensities={"AU1": 1.0}, captions={"au_rule": "The person raises the inner eyebrows."})
    none = Record(id="n", image="x.png", source="t", split="train", aus={"AU9": 1})  # no AU of ours
    assert vlfau_samples(cfg.aus)(none) == [] and vlfau_samples(cfg.aus)(rec) == [{}]
    batch = VLFAUCollate(tokenizer, cfg).encode([rec])
    assert batch["au_mask"].tolist() == [[True, True, True, False]]  # AU25 unannotated
    assert batch["aus"].tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert batch["local_index"].tolist() == [[0, 0], [0, 2]]
    assert [find_aus(t) for t in batch["local_texts"]] == [["AU1"], ["AU12"]]
    assert batch["local_texts"][0] == "The person slightly raises the inner eyebrows."
    assert tokenizer.decode(batch["local_ids"][1]) == "The person pulls the lip corners upward."
    assert (batch["local_labels"] == -100).sum() == (batch["local_mask"] == 0).sum()
    with pytest.raises(ValueError, match="record r: no caption 'fused'"):
        VLFAUCollate(tokenizer, replace(cfg, global_caption="fused")).encode([rec])


def test_every_au_local_description_names_exactly_that_au():
    for au in SYNTHFACS_AUS + DATASET_AUS["bp4d"] + DATASET_AUS["disfa"]:
        for intensity in (None, 1.0, 4.0):
            assert find_aus(local_description(au, intensity)) == [au]


def test_pos_weight_and_dice():
    aus = torch.tensor([[1, 0], [0, 0], [0, 1], [0, 0.]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1]]).bool()
    torch.testing.assert_close(au_pos_weight(aus, mask), torch.tensor([3.0, 3.0]))  # the unannotated 1 is ignored
    rare = torch.zeros(31, 1)
    rare[0] = 1
    torch.testing.assert_close(au_pos_weight(rare), torch.tensor([20.0]))  # 30 / 1, capped
    assert dice([], []) == 1.0 and dice(["AU1"], []) == 0.0 and dice(["AU1", "AU2"], ["AU1"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="pos_weight has 1 values for 4 AUs"):
        VLFAUConfig(aus=AUS, pos_weight=[1.0])


def test_lightning_checkpoint_holds_only_trained_parameters(tokenizer):
    import lightning as L
    feats, records = make_data(8, seed=4)
    batch = {"features": feats, **VLFAUCollate(tokenizer, tiny_cfg(tokenizer)).encode(records)}
    lit = LitVLFAU(VLFAU(tiny_cfg(tokenizer)), optim=OptimConfig(lr=1e-3, warmup_steps=0), total_steps=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader([batch, batch], batch_size=None)  # ready-made batches
    trainer.fit(lit, train_dataloaders=loader, val_dataloaders=loader)
    keys = set(lit.state_dict())
    assert keys and all(k.startswith(("model.ln_vision.", "model.qformer.", "model.au.", "model.llm_proj."))
                        for k in keys)
    assert "val/au_f1" in trainer.callback_metrics
    fresh = LitVLFAU(VLFAU(tiny_cfg(tokenizer)), optim=OptimConfig(), total_steps=1)
    fresh.load_state_dict(lit.state_dict())
    torch.testing.assert_close(fresh.model.au.query_tokens, lit.model.au.query_tokens)
    with pytest.raises(RuntimeError, match="missing"):
        fresh.load_state_dict({k: v for k, v in lit.state_dict().items() if "model.au." not in k})


def test_recipe_configs_load():
    syn = load_config(VLFAURecipe, [REPO / "configs" / "vlfau_synthfacs.yaml"])
    assert syn.model.aus == list(SYNTHFACS_AUS) and syn.model.local_weight > 0 and syn.model.global_weight > 0
    parts = ["data.root=/data", "llm_tokenizer=/t.model", "model.vision.pretrained=/eva.pt"]  # no defaults
    bp4d = load_config(VLFAURecipe, [REPO / "configs" / "vlfau_bp4d.yaml"], parts)
    assert bp4d.model.aus == list(DATASET_AUS["bp4d"]) and bp4d.fold_protocol in PROTOCOLS
    assert bp4d.test_folds == [1, 2, 3]
    abl = load_config(VLFAURecipe, [REPO / "configs" / "vlfau_bp4d.yaml"], [*parts, "model.local_weight=0"])
    assert abl.model.local_weight == 0 and abl.model.uses_language  # the global loss stays on
    with pytest.raises(ConfigError):
        load_config(VLFAURecipe, [REPO / "configs" / "vlfau_bp4d.yaml"], [*parts, "model.local_wieght=0"])


def test_trained_tiny_model_explains_its_predictions(tokenizer):
    torch.manual_seed(0)
    cfg = tiny_cfg(tokenizer, train_language_model=True, local_adverbs=False)
    model = VLFAU(cfg)
    freeze(model, trainable_prefixes(model))
    collate = VLFAUCollate(tokenizer, cfg)
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-2, min_lr=2e-3, warmup_steps=10, warmup_lr=0.0,
                                                    weight_decay=0.0), total_steps=120)
    model.pos_weight = torch.full((len(AUS),), 1.5)  # = au_pos_weight at a 40 % positive rate
    model.train()
    for step in range(120):  # a fresh batch every step, as a stream gives: nothing to memorise
        feats, records = make_data(32, seed=100 + step)
        batch = collate.encode(records)
        lang = {k: batch[k] for k in batch if k.startswith(("local_", "global_")) and "texts" not in k}
        out = model.losses(model.embed_features(feats), batch["aus"], batch["au_mask"], **lang)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sched.step()
    assert out["loss_au"] < 0.1 and out["loss_local"] < 0.2, {k: float(v) for k, v in out.items() if "loss" in k}

    model.eval()
    test_feats, test_records = make_data(12, seed=6)
    explanations = model.explain(model.embed_features(test_feats), tokenizer)
    truth = [[a for a in AUS if r.aus[a]] for r in test_records]
    assert sum(e.predicted == t for e, t in zip(explanations, truth)) >= 10
    assert sum(len(t) for t in truth) >= 8  # the check below is not vacuous
    for e in explanations:
        assert sorted(e.local) == sorted(e.predicted) and set(e.probs) == set(AUS)
        for au, sentence in e.local.items():
            assert find_aus(sentence) == [au], (au, sentence)
        assert e.local_consistency == 1.0
    assert sum(e.agreement for e in explanations) / len(explanations) > 0.9
    assert sum(e.global_agreement for e in explanations) / len(explanations) > 0.8


def test_a_lavis_checkpoint_initialises_the_general_queries_and_ln_vision(tokenizer, tmp_path):
    from expvl.models.convert.lavis import lavis_key_map
    from expvl.models.convert.weights import CheckpointError
    from expvl.models.qformer import QFormer
    from expvl.training.vlfau import load_qformer_init
    model = VLFAU(tiny_cfg(tokenizer))
    source = QFormer(replace(model.qformer.cfg, text_input=True, lm_head=True))  # a stage-1 Q-Former
    ours = source.state_dict()
    state = {theirs: ours[key] for key, theirs in lavis_key_map(source).items()}
    state |= {"ln_vision.weight": torch.full((WIDTH,), 2.0), "ln_vision.bias": torch.full((WIDTH,), 0.5)}
    torch.save({"model": state}, tmp_path / "blip2_stage1.pth")
    au_queries = model.au.query_tokens.detach().clone()
    load_qformer_init(model, str(tmp_path / "blip2_stage1.pth"))
    for name, p in model.qformer.state_dict().items():
        torch.testing.assert_close(p, ours[name], msg=name)
    assert torch.equal(model.ln_vision.weight, state["ln_vision.weight"])
    assert torch.equal(model.au.query_tokens, au_queries)  # VL-FAU's own queries: not in BLIP-2
    del state["ln_vision.bias"]
    torch.save({"model": state}, tmp_path / "no_ln.pth")
    with pytest.raises(CheckpointError, match="no_ln.pth.*ln_vision"):
        load_qformer_init(model, str(tmp_path / "no_ln.pth"))


def test_a_transformers_blip2_folder_initialises_the_general_queries_and_ln_vision(tokenizer, tmp_path):
    """`qformer_checkpoint=<a transformers Blip2 folder>`: the query-only Q-Former gives transformers'
    query outputs, ln_vision is its vision post_layernorm, the AU queries stay fresh; InstructBlip's
    instruction-reading Q-Former does not fit and says so."""
    transformers = pytest.importorskip("transformers")
    from expvl.models.convert.weights import CheckpointError
    from expvl.training.vlfau import load_qformer_init
    model = VLFAU(tiny_cfg(tokenizer)).eval()
    q = model.qformer.cfg
    qformer = {"hidden_size": q.hidden_size, "num_hidden_layers": q.num_layers, "num_attention_heads": q.num_heads,
               "intermediate_size": q.intermediate_size, "encoder_hidden_size": WIDTH,
               "cross_attention_frequency": q.cross_attention_freq, "vocab_size": q.vocab_size,
               "max_position_embeddings": q.max_position_embeddings}
    vision = {"hidden_size": WIDTH, "intermediate_size": 2 * WIDTH, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 28, "patch_size": 14}
    text = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4}
    torch.manual_seed(0)
    hf = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=q.num_query_tokens)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "blip2")
    au_queries = model.au.query_tokens.detach().clone()
    load_qformer_init(model, str(tmp_path / "blip2"))
    image = torch.randn(2, 5, WIDTH)
    with torch.no_grad():
        theirs = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=image)
        ours = model.qformer.encode_queries(image)["hidden"]
    torch.testing.assert_close(ours, theirs.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.ln_vision.weight, hf.vision_model.post_layernorm.weight)
    assert torch.equal(model.au.query_tokens, au_queries)
    hf_ib = transformers.InstructBlipForConditionalGeneration(transformers.InstructBlipConfig(
        vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=q.num_query_tokens))
    hf_ib.save_pretrained(tmp_path / "instructblip")
    with pytest.raises(CheckpointError, match="reads the instruction"):
        load_qformer_init(model, str(tmp_path / "instructblip"))
