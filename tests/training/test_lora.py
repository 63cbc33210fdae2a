"""LoRA (models/lora.py, peft's adapters) through the stage machinery: what trains, what is saved and reloaded
strictly, the merge for export, and the refusals.

The unit tests use a tiny Blip2 (tiny-vit tower, 2-layer LLaMA); the module fixture `lora_run` trains a
real stage 3 with LoRA on every LLaMA projection and on the conv stand-in encoder, through the real
Trainer (`run_stage`, as `train.py mode=stage` does) on the small local parts of
tests/helpers/stage_parts.py, keeping the trained model in memory to compare the reloaded one with.
"""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from expvl.configs import ConfigError, load_config, save_config
from expvl.configs.schema import RunConfig
from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.convert import load_hf_llm
from expvl.models.convert.hf_export import save_hf_llama, save_merged_llama
from expvl.models.convert.weights import CheckpointError
from expvl.models.llm import LLaMA, LLMConfig
from expvl.models.lora import (
    LORA_MARKER,
    LoRAConfig,
    adapter_names,
    add_adapters,
    apply_lora,
    is_adapter,
    merge_lora,
)
from expvl.models.optim import OptimConfig
from expvl.models.qformer import QFormerConfig
from expvl.models.vision import VisionConfig, VisionEncoder
from expvl.training.checkpoints import load_trained
from expvl.training.lit_base import Trainable
from expvl.training.lit_blip2 import LitLanguage, LitPretrain
from expvl.training.stages import STAGES, build_stage_model, init_from_stage_checkpoints, trainable
from tests.helpers.stage_parts import parts, stage_args  # noqa: F401 -- module fixture

QF = QFormerConfig.from_name("tiny", hidden_dropout=0.0, attention_dropout=0.0, vocab_size=40)
LLM = LLMConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=128)
ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(stage: str, lora: LoRAConfig | None = None) -> Blip2:
    model = Blip2(Blip2Config(stage=stage, vision=VisionConfig.from_name("tiny-vit"), qformer=QF,
                              llm=None if stage == "pretrain" else LLM, embed_dim=16))
    if lora is not None:
        apply_lora(model, lora)
    return model


def _batch(B=3, T=6, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100  # the prompt part carries no loss
    qf = torch.randint(5, 40, (B, 5), generator=g)
    return {"images": torch.randn(B, 3, 64, 64, generator=g), "llm_ids": ids, "llm_mask": torch.ones_like(ids),
            "labels": labels, "qf_ids": qf, "qf_mask": torch.ones_like(qf)}


def _loss(model: Blip2, batch: dict) -> torch.Tensor:
    instruct = model.cfg.stage == "instruct"
    return model.lm_loss(model.encode_image(batch["images"]), batch["llm_ids"], batch["llm_mask"], batch["labels"],
                         instruction_ids=batch["qf_ids"] if instruct else None,
                         instruction_mask=batch["qf_mask"] if instruct else None)["loss"]


def _randomize_adapters(module: nn.Module, seed: int = 0) -> None:
    """lora_B starts at zero (the adapted model = the plain one): make the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---- the mechanism: which parameters train, what is kept, which modes ----------------------------------

def test_trainable_takes_prefixes_and_adapter_markers_wherever_they_sit():
    t = Trainable(("qformer.", "llm_proj."), markers=(LORA_MARKER,))
    assert t("qformer.bert.layer.0.weight") and t("llm_proj.weight")
    assert t("llm.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert not t("llm.model.layers.0.self_attn.q_proj.base_layer.weight")
    assert not t("llm.model.flora_x.weight")  # a name part must start with the marker
    assert Trainable.of(("qformer.",)) == Trainable(("qformer.",)) and Trainable.of(t) is t
    assert LORA_MARKER == __import__("peft").tuners.lora.LoraModel.prefix  # peft's own naming


@pytest.mark.parametrize("stage", ["caption", "instruct"])
def test_after_freeze_exactly_the_adapters_and_the_stage_parts_train_and_the_base_never_moves(stage):
    model = _model(stage)
    names = apply_lora(model, LoRAConfig(rank=4, dropout=0.1, target_modules=["q_proj", "v_proj"],
                                         vision_target_modules=["c_fc"]))
    # 2 LLM layers x (q_proj, v_proj) x (A, B) + the one kept ViT block's c_fc x (A, B)
    assert len(names) == 10 and all(is_adapter(n) for n in names)
    assert sum(n.startswith("vision.") for n in names) == 2
    lit = LitLanguage(model, trainable=trainable(model), optim=OptimConfig(lr=1e-2, warmup_steps=0),
                      total_steps=5)
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == {n for n, _ in model.named_parameters() if n.startswith(STAGES[stage].trains)} | set(names)
    assert lit.counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in grads)

    # modes: the frozen LLM and encoder stay in eval (no dropout in their own layers), the adapters' dropout
    # follows the trainer
    lit.train()
    q = model.llm.model.layers[0].self_attn.q_proj
    assert not model.llm.training and not q.base_layer.training and not model.vision.visual.training
    assert q.lora_dropout["default"].training and model.qformer.training
    lit.eval()
    assert not q.lora_dropout["default"].training

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in grads}
    lit.train()
    opt = lit.configure_optimizers()["optimizer"]
    for step in range(3):
        opt.zero_grad()
        _loss(model, _batch(seed=step)).backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # zero at the start: every adapter trained


def test_trimmed_checkpoint_holds_the_adapters_and_reloads_strictly_naming_a_missing_one():
    lora = LoRAConfig(rank=4, target_modules=ALL_LLAMA)
    model = _model("instruct", lora)
    lit = LitLanguage(model, trainable=trainable(model), optim=OptimConfig(), total_steps=1)
    state = lit.state_dict()
    adapters = {f"model.{n}" for n in adapter_names(model)}
    assert adapters and adapters <= set(state)
    assert not [k for k in state if k.startswith(("model.llm.", "model.vision.")) and k not in adapters]
    fresh = LitLanguage(_model("instruct", lora), trainable=trainable(_model("instruct", lora)),
                        optim=OptimConfig(), total_steps=1)
    fresh.load_state_dict(state)  # the same set: loads
    missing = sorted(adapters)[3]
    with pytest.raises(RuntimeError, match=rf"missing \['{missing}'\] \(1\)"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != missing})
    plain = LitLanguage(_model("instruct"), trainable=trainable(_model("instruct")), optim=OptimConfig(),
                        total_steps=1)
    with pytest.raises(RuntimeError, match=r"unexpected \['model\.llm\.model\.layers\.0\.mlp\.down_proj\.lora_A"):
        plain.load_state_dict(state)  # a checkpoint with adapters into a model without: refused


def test_adapters_are_a_stage_s_own_and_never_handed_on(tmp_path):
    def save(lit, name, stage):
        torch.save({"state_dict": lit.state_dict(), "stage": stage}, tmp_path / name)
        return tmp_path / name

    m1 = _model("pretrain")
    ck1 = save(LitPretrain(m1, trainable=trainable(m1), optim=OptimConfig(), total_steps=1, dec_token_id=4,
                           pad_token_id=0), "1.ckpt", "pretrain")
    m2 = _model("caption", LoRAConfig(rank=4, vision_target_modules=["c_fc"]))
    _randomize_adapters(m2)
    ck2 = save(LitLanguage(m2, trainable=trainable(m2), optim=OptimConfig(), total_steps=1), "2.ckpt", "caption")
    m3 = _model("instruct", LoRAConfig(rank=4, vision_target_modules=["c_fc"]))
    own = {n: p.detach().clone() for n, p in m3.named_parameters() if is_adapter(n)}
    vision = {n: p.detach().clone() for n, p in m3.vision.named_parameters()}
    loaded = init_from_stage_checkpoints(m3, [ck1, ck2])
    assert "llm_proj.weight" in loaded and not [k for k in loaded if is_adapter(k) or k.startswith("vision.")]
    assert all(torch.equal(p, own[n]) for n, p in m3.named_parameters() if is_adapter(n))
    assert all(torch.equal(p, vision[n]) for n, p in m3.vision.named_parameters())  # adapters hand on no encoder


class _Tok:  # what blip2_config reads of a tokenizer
    vocab_size, pad_id = 40, 0


def test_build_stage_model_adapts_its_own_copy_of_the_shared_llm():
    cfg = load_config(RunConfig, [], ["stage2.lora.rank=4", "stage3.lora.rank=2"])
    shared = LLaMA(LLM)
    encoder = _model("caption").vision
    m2 = build_stage_model(cfg, "caption", {"qformer": _Tok()}, encoder, shared)
    m3 = build_stage_model(cfg, "instruct", {"qformer": _Tok()}, encoder, shared)
    assert adapter_names(shared) == [] and m2.llm is not shared and m3.llm is not m2.llm
    assert m2.llm.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 4
    assert m3.llm.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 2
    assert m2.vision is encoder  # no encoder adapters asked: the encoder is not copied
    plain = build_stage_model(load_config(RunConfig, [], []), "caption", {"qformer": _Tok()}, encoder, shared)
    assert plain.llm is shared and not adapter_names(plain)


# ---- merging for export --------------------------------------------------------------------------------

def test_merge_gives_the_adapted_outputs_with_plain_layers_and_exports_a_plain_llama(tmp_path):
    llm = LLaMA(LLM).eval()
    base = {k: v.clone() for k, v in llm.state_dict().items()}
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        plain = llm(input_ids=ids)["logits"]
    add_adapters(llm, ALL_LLAMA, LoRAConfig(rank=4, alpha=8.0), where="the LLM")
    with torch.no_grad():
        assert torch.equal(llm(input_ids=ids)["logits"], plain)  # lora_B = 0: the same model at the start
        _randomize_adapters(llm)
        adapted = llm(input_ids=ids)["logits"]
    assert (adapted - plain).abs().max() > 0.1  # the adapters matter, so a merge that dropped them would fail
    with pytest.raises(ValueError, match="save_merged_llama"):
        save_hf_llama(llm, tmp_path / "unmerged")

    folder = save_merged_llama(llm, tmp_path / "merged")  # a copy merged: llm keeps its adapters
    assert adapter_names(llm)
    exported = load_hf_llm(folder).eval()
    merged = merge_lora(copy.deepcopy(llm))
    with torch.no_grad():
        diffs = [(m(input_ids=ids)["logits"] - adapted).abs().max().item() for m in (merged, exported)]
    print(f"merged vs adapted logits: max |diff| {diffs[0]:.2e} (in memory), {diffs[1]:.2e} (exported folder)")
    assert max(diffs) < 2e-5  # fp32 rounding of (W + s B A) x against W x + s B (A x); dropped adapters: > 0.1
    assert not adapter_names(merged) and type(merged.model.layers[1].mlp.down_proj) is nn.Linear
    assert set(merged.state_dict()) == set(base) and not hasattr(merged, "peft_config")
    assert not torch.equal(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    transformers = pytest.importorskip("transformers")
    with torch.no_grad():
        hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()(input_ids=ids).logits
    torch.testing.assert_close(hf, adapted, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapters_on_a_low_precision_llm_are_fp32_and_merge_into_its_dtype(dtype):
    llm = LLaMA(LLM).to(dtype).eval()  # mode: stage loads the LLM in pretrained.llm_dtype (fp16 by default)
    add_adapters(llm, ["q_proj", "down_proj"], LoRAConfig(rank=4), where="the LLM")
    assert {p.dtype for n, p in llm.named_parameters() if is_adapter(n)} == {torch.float32}  # what trains
    _randomize_adapters(llm)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        adapted = llm(input_ids=ids)["logits"]
        merged = merge_lora(llm)(input_ids=ids)["logits"]
    assert adapted.dtype == merged.dtype == dtype and llm.model.layers[0].mlp.down_proj.weight.dtype == dtype
    # the merged weight is rounded to the LLM's dtype once: the same outputs to that dtype's precision
    torch.testing.assert_close(merged.float(), adapted.float(), rtol=0, atol=0.05 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize(("tower", "targets"), [("tiny-vit", ["c_fc", "c_proj"]), ("tiny-conv", ["conv2"])])
def test_merged_encoder_adapters_give_the_adapted_tokens(tower, targets):
    model = Blip2(Blip2Config(stage="caption", vision=VisionConfig.from_name(tower), qformer=QF, llm=LLM))
    apply_lora(model, LoRAConfig(rank=2, target_modules=["q_proj"], vision_target_modules=targets))
    _randomize_adapters(model.vision)
    images = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        adapted = model.encode_image(images)
        merge_lora(model.vision)
        merged = model.encode_image(images)
    assert not adapter_names(model.vision)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)


# ---- refusals ----------------------------------------------------------------------------------------------

def test_a_target_that_matches_no_layer_is_refused_naming_the_layers_there_are():
    model = _model("instruct")
    with pytest.raises(ValueError, match=r"'qproj' matches no layer of the LLM \(LLaMA\); its adaptable layers "
                                         r"are named \['down_proj', 'gate_proj', 'k_proj', .*'q_proj'"):
        apply_lora(model, LoRAConfig(rank=4, target_modules=["q_proj", "qproj"]))
    with pytest.raises(ValueError, match=r"'out_proj' matches no layer of the image encoder .*MultiheadAttention"):
        apply_lora(model, LoRAConfig(rank=4, vision_target_modules=["out_proj"]))
    assert not adapter_names(model)  # refused before anything was injected, the LLM included
    apply_lora(model, LoRAConfig(rank=4, target_modules=["self_attn.q_proj"]))  # a dotted suffix matches
    with pytest.raises(ValueError, match="has LoRA adapters already"):
        apply_lora(model, LoRAConfig(rank=4))
    with pytest.raises(ValueError, match="stage 1 has none"):
        apply_lora(_model("pretrain"), LoRAConfig(rank=4))


def test_stage1_lora_and_encoder_lora_on_cached_features_are_refused_at_config_load():
    with pytest.raises(ConfigError, match=r"stage1\.lora\.rank=4: this stage has no LLM to adapt"):
        load_config(RunConfig, [], ["stage1.lora.rank=4"])
    with pytest.raises(ConfigError, match=r"stage3\.lora\.vision_target_modules=\['c_fc'\]: the embedded default"):
        load_config(RunConfig, [], ["stage3.lora.rank=4", "stage3.lora.vision_target_modules=[c_fc]"])
    with pytest.raises(ConfigError, match=r"stage2\.lora\.rank must be >= 0"):
        load_config(RunConfig, [], ["stage2.lora.rank=-1"])
    with pytest.raises(ConfigError, match=r"stage3\.lora\.target_modules is empty"):
        load_config(RunConfig, [], ["stage3.lora.rank=4", "stage3.lora.target_modules=[]"])
    assert load_config(RunConfig, [], ["stage1.lora.vision_target_modules=[c_fc]"]).stage1.lora.rank == 0  # off
    # mode: stage sends images through the encoder (the lora_run fixture below trains such adapters)
    LoRAConfig(rank=4, vision_target_modules=["c_fc"]).check("stage3.lora", sees_images=True)


# ---- a real stage 3 with LoRA: the Trainer, final.ckpt, the run loader, export -----------------------------

STEPS = 25


@pytest.fixture(scope="module")
def lora_run(parts, tmp_path_factory):  # noqa: F811
    from dataclasses import asdict

    from expvl.training.single_stage import build_stage_parts, init_stage_weights
    from expvl.training.stages import run_stage, stage_data

    root = tmp_path_factory.mktemp("lora")
    # the shared parts' random LLaMA (init std 0.02, tied embeddings) can only make near-uniform logits
    # (|h| ~ sqrt(32), |e| ~ 0.1): no training of anything before it could lower the loss much. Its
    # embeddings scaled up let a trained soft prompt and adapters make the answers likely
    llm = load_hf_llm(parts["llm"])
    with torch.no_grad():
        llm.model.embed_tokens.weight.mul_(20.0)
    save_hf_llama(llm, root / "llm")
    # a weights file for the frozen encoder: a random one would be drawn anew when the run loader rebuilds it
    encoder = VisionEncoder(VisionConfig.from_name("tiny-conv"))
    torch.save({f"visual.{k}": v for k, v in encoder.visual.state_dict().items()}, root / "encoder.pt")
    run_dir = root / "run"
    args = stage_args(parts, run_dir, "instruct", f"pretrained.llm={root / 'llm'}",
                      f"model.vision.pretrained={root / 'encoder.pt'}", "stage3.lora.rank=4",
                      f"stage3.lora.target_modules=[{','.join(ALL_LLAMA)}]", "stage3.lora.vision_target_modules=[visual.conv2,visual.conv3]",
                      f"stage3.max_steps={STEPS}", "stage3.batch_size=4", "stage3.optim.warmup_steps=2",
                      "stage3.optim.lr=1e-2")
    assert args[:2] == ["--config", "tiny"]
    cfg = load_config(RunConfig, ["tiny"], args[2:])
    save_config(cfg, run_dir / "config.yaml")
    built = build_stage_parts(cfg)  # what run_single_stage does, keeping the trained model here
    init_stage_weights(built.model, cfg.pretrained)
    model = built.model
    data = stage_data(cfg, STAGES["instruct"], cfg.data.root, built.tokenizers, encoder=built.encoder)
    batch = next(iter(data.val_dataloader()))  # one fixed batch for every comparison
    base = {n: p.detach().clone() for n, p in model.named_parameters()  # the frozen weights around the adapters
            if n.startswith(("llm.", "vision.")) and not is_adapter(n)}
    with torch.no_grad():
        before = _loss(model.eval(), batch).item()
    final = run_stage(cfg, STAGES["instruct"], model=model, data=data, tokenizers=built.tokenizers,
                      inputs={"config": asdict(cfg)})
    model.eval()
    with torch.no_grad():
        after = _loss(model, batch).item()
    print(f"stage 3 with LoRA, fixed-batch loss: {before:.3f} before, {after:.3f} after {STEPS} steps")
    return {"dir": run_dir, "final": final, "model": model, "batch": batch, "base": base, "before": before,
            "after": after}


def _llm_logits(model: Blip2, batch: dict, llm: nn.Module | None = None) -> torch.Tensor:
    """The LLM's logits over [soft prompt | question | answer]; `llm` in place of the model's own."""
    llm = model.llm if llm is None else llm
    with torch.no_grad():
        prompt = model.soft_prompt(model.encode_image(batch["images"]), batch["qf_ids"], batch["qf_mask"])
        embeds, mask = llm.prefixed(prompt, batch["llm_ids"], batch["llm_mask"])
        return llm(inputs_embeds=embeds, attention_mask=mask)["logits"]


@pytest.mark.slow
def test_the_stage_trains_its_adapters_its_loss_falls_and_the_base_weights_stay(lora_run):
    model = lora_run["model"]
    assert lora_run["after"] < 0.8 * lora_run["before"]
    adapters = adapter_names(model)
    llm = [n for n in adapters if n.startswith("llm.")]
    vision = [n for n in adapters if n.startswith("vision.")]
    assert len(llm) == 2 * len(ALL_LLAMA) * model.llm.config.n_layers and len(llm) + len(vision) == len(adapters)
    # the stem's convolutions (a dotted suffix): CLIP's ResNet blocks start with bn3.weight = 0, so in this
    # untrained stand-in their branches pass no gradient to a conv inside them
    assert sorted({n.split(".lora_")[0] for n in vision}) == ["vision.visual.conv2", "vision.visual.conv3"]
    assert "llm.model.layers.0.self_attn.q_proj.base_layer.weight" in lora_run["base"]
    for name, p in model.named_parameters():
        if name in lora_run["base"]:
            assert torch.equal(p, lora_run["base"][name]), name
        if ".lora_B." in name:
            assert p.abs().sum() > 0, name  # zero at the start: it trained


@pytest.mark.slow
def test_final_checkpoint_holds_the_adapters_and_nothing_of_the_frozen_llm_or_encoder(lora_run):
    ck = torch.load(lora_run["final"], map_location="cpu", weights_only=True)
    keys = set(ck["state_dict"])
    assert {f"model.{n}" for n in adapter_names(lora_run["model"])} <= keys
    assert not [k for k in keys if k.startswith(("model.llm.", "model.vision.")) and not is_adapter(k)]
    assert ck["run_config"]["stage3"]["lora"]["rank"] == 4


@pytest.mark.slow
def test_the_run_loader_rebuilds_the_trained_model_and_a_missing_adapter_key_fails_naming_it(lora_run, tmp_path):
    from expvl.training.runs import open_run

    trained, batch = lora_run["model"], lora_run["batch"]
    reloaded = open_run(lora_run["dir"]).stage_model("instruct")
    assert reloaded is not trained and adapter_names(reloaded) == adapter_names(trained)
    diff = (_llm_logits(reloaded, batch) - _llm_logits(trained, batch)).abs().max().item()
    print(f"open_run model vs trained model: max |logit diff| {diff:.1e}")
    assert diff == 0.0
    with torch.no_grad():
        assert _loss(reloaded, batch).item() == pytest.approx(lora_run["after"], abs=1e-6)

    ck = torch.load(lora_run["final"], map_location="cpu", weights_only=True)
    gone = "model.llm.model.layers.0.mlp.up_proj.lora_B.default.weight"
    del ck["state_dict"][gone]
    torch.save(ck, tmp_path / "final.ckpt")
    with pytest.raises(CheckpointError, match=r"missing \['llm\.model\.layers\.0\.mlp\.up_proj\.lora_B\.default"
                                              r"\.weight'\] \(1\)"):
        load_trained(reloaded, tmp_path / "final.ckpt", trainable(reloaded), stage="instruct")


@pytest.mark.slow
def test_the_trained_llm_merged_for_export_gives_the_adapted_logits(lora_run, tmp_path):
    trained, batch = lora_run["model"], lora_run["batch"]
    adapted = _llm_logits(trained, batch)
    folder = save_merged_llama(trained, tmp_path / "hf")
    exported = load_hf_llm(folder).eval()
    assert not adapter_names(exported) and adapter_names(trained)  # the export merged a copy
    diff = (_llm_logits(trained, batch, llm=exported) - adapted).abs().max().item()
    print(f"exported merged LLM vs adapted, trained stage 3: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    assert Path(folder, "config.json").exists()
