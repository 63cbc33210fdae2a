"""Every shipped YAML loads against the schema; typos fail with the key; recipes build on `meta`."""

from dataclasses import replace

import pytest
import torch

from expvl.configs import CONFIG_DIR, ConfigError, load_config, save_config
from expvl.configs.schema import RunConfig
from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.llm import LLMConfig
from expvl.models.vision import VisionEncoder
from expvl.vocab.records import Record

REQUIRED = ["data.root=/data", "pretrained.qformer_vocab=/vocab.txt", "pretrained.llm=/llm",
            "pretrained.llm_tokenizer=/tokenizer.model", "model.vision.pretrained=/eva_vit_g.pth",
            "pretrained.lavis_checkpoint=/blip2.pth"]
RECIPES = sorted(p for p in (CONFIG_DIR / "recipes").glob("*.yaml") if not p.name.startswith("_"))
PRESETS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("vlfau"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_presets_load(path):
    cfg = load_config(RunConfig, [path])
    assert cfg.mode == "pipeline"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipes_load_on_the_shared_base(path):
    files = [CONFIG_DIR / "recipes" / "_blip2_vitg.yaml"]
    if path.name == "expvqa_frozen_vit.yaml":
        files.append(CONFIG_DIR / "recipes" / "expvqa_vicuna7b.yaml")
    cfg = load_config(RunConfig, files + [path], REQUIRED)
    assert cfg.mode == "stage" and cfg.model.vision.model_name == "EVA01-g-14"
    assert cfg.model.qformer.hidden_size == 768 and cfg.model.qformer.encoder_width == 1408


def test_typos_and_bad_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"stage1\.optim\.lrr.*did you mean 'stage1\.optim\.lr'"):
        load_config(RunConfig, [], ["stage1.optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"stage1\.max_steps"):
        load_config(RunConfig, [], ["stage1.max_steps=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("synthesis:\n  synthfacs:\n    n_trian: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*n_trian.*did you mean 'synthesis\.synthfacs\.n_train'"):
        load_config(RunConfig, [bad])
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, [tmp_path / "missing.yaml"])
    with pytest.raises(ValueError, match="mode=stage needs data.root"):
        load_config(RunConfig, [], ["mode=stage"])
    with pytest.raises(ValueError, match=r"data\.stream\.group_by_length is set per stage.*stage3"):
        load_config(RunConfig, [], ["data.stream.group_by_length=4"])
    with pytest.raises(ValueError, match=r"stage2\.group_by_length must be >= 0"):
        load_config(RunConfig, [], ["stage2.group_by_length=-1"])
    with pytest.raises(ValueError, match=r"stage3\.loss_norm is 'token'"):
        load_config(RunConfig, [], ["stage3.loss_norm=token"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(RunConfig, ["tiny"], ["stage2.max_steps=7"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(RunConfig, [path])
    assert again == cfg and again.stage2.max_steps == 7


@pytest.mark.parametrize("stage,llm", [("pretrain", None), ("caption", "llama2-7b"), ("instruct", "vicuna-7b")])
def test_real_recipe_shapes_build_on_meta(stage, llm):
    """EVA ViT-g/14 + BLIP-2 Q-Former (+ a 7B LLaMA) instantiated without memory: shapes only."""
    cfg = load_config(RunConfig, [CONFIG_DIR / "recipes" / "_blip2_vitg.yaml"], REQUIRED)
    llm_cfg = None if llm is None else LLMConfig.from_name(llm, vocab_size=32001)
    vision_cfg = replace(cfg.model.vision, pretrained="")
    with torch.device("meta"):
        model = Blip2(Blip2Config(stage=stage, vision=vision_cfg, qformer=cfg.model.qformer, llm=llm_cfg,
                                  embed_dim=cfg.model.embed_dim),
                      vision=VisionEncoder(vision_cfg, device="meta"))
    assert model.vision.width == 1408 and model.vision.num_tokens == 257
    n_q = sum(p.numel() for p in model.qformer.parameters())
    # BLIP-2 reports ~188M for the full Q-Former; stage 2 keeps the query side only
    expected = {"pretrain": (185e6, 188e6), "caption": (104e6, 106e6), "instruct": (185e6, 187e6)}[stage]
    assert expected[0] < n_q < expected[1], n_q
    if llm is not None:
        n_llm = sum(p.numel() for p in model.llm.parameters())
        assert 6.5e9 < n_llm < 7.0e9
        assert model.llm_proj.weight.shape == (4096, 768)


def test_every_shipped_yaml_names_a_system_whose_schema_loads_it():
    from expvl.configs import config_system
    from expvl.configs.schema import SCHEMAS

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        system = config_system([path])
        assert system in SCHEMAS, path
        extra = REAL_PARTS if path.name == "vlfau_bp4d.yaml" else []
        cfg = load_config(SCHEMAS[system], [path], extra)
        assert cfg.system == system
    assert config_system(["default"], ["system=vlfau"]) == "vlfau"  # an override has the last word


REAL_PARTS = ["data.root=/data", "llm_tokenizer=/t.model", "model.vision.pretrained=/eva.pt"]


def test_a_vlfau_recipe_without_data_or_tokenizer_is_refused():
    from expvl.configs.schema import VLFAURecipe

    with pytest.raises(ValueError, match="parts_from"):
        load_config(VLFAURecipe, ["vlfau_bp4d"], ["data.root=''"])
    with pytest.raises(ValueError, match="llm_tokenizer"):
        load_config(VLFAURecipe, ["vlfau_bp4d"], ["data.root=/data", "llm_tokenizer=''"])
    with pytest.raises(ValueError, match="model.vision.pretrained.*EVA_VIT_G"):
        load_config(VLFAURecipe, ["vlfau_bp4d"], ["data.root=/data", "llm_tokenizer=/t.model"])
    with pytest.raises(ValueError, match="test_folds"):
        load_config(VLFAURecipe, ["vlfau_bp4d"], [*REAL_PARTS, "test_folds=[]"])
    with pytest.raises(ConfigError, match="fold_protocl.*did you mean 'fold_protocol'"):
        load_config(VLFAURecipe, ["vlfau_synthfacs"], ["fold_protocl=bp4d"])


def test_vlfau_folds_are_one_based():
    from expvl.configs.schema import VLFAURecipe

    with pytest.raises(ValueError, match="1-based"):
        load_config(VLFAURecipe, ["vlfau_bp4d"], [*REAL_PARTS, "test_folds=[0,1,2]"])


def test_a_run_folder_written_before_the_loss_norm_rename_still_loads(tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text("stage2:\n  loss_per_sample: true\nstage3:\n  loss_per_sample: false\n  max_steps: 7\n")
    cfg = load_config(RunConfig, [old])
    assert (cfg.stage2.loss_norm, cfg.stage3.loss_norm, cfg.stage3.max_steps) == ("sample", "batch", 7)
    with pytest.raises(ConfigError, match="unknown key 'stage3.loss_per_sampel'"):
        load_config(RunConfig, [], ["stage3.loss_per_sampel=true"])  # overrides are not migrated


def test_a_misspelt_caption_kind_or_vqa_type_names_the_key_and_suggests_the_kind(tmp_path):
    with pytest.raises(ConfigError, match=r"stage1\.captions: unknown value 'emotoin' \(did you mean 'emotion'\?\); "
                                          r"allowed: au_rule, au_paper, au_llm, emotion, fused, cat, region:"):
        load_config(RunConfig, [], ["stage1.captions=[au_rule,emotoin]"])
    exp = tmp_path / "exp.yaml"
    exp.write_text("stage3:\n  vqa_types: [q1, q_3]\n")
    with pytest.raises(ConfigError, match=r"stage3\.vqa_types: unknown value 'q_3' \(did you mean 'q3'\?\); "
                                          r"allowed: q1, q2, q3, emotion"):
        load_config(RunConfig, [exp])
    with pytest.raises(ConfigError, match=r"stage2\.captions: unknown value 'region:lips'.*region:mouth"):
        load_config(RunConfig, [], ["stage2.captions=[region:lips]"])
    assert load_config(RunConfig, [], ["stage2.captions=[region:mouth,au_llm]"]).stage2.captions[0] == "region:mouth"


def test_a_misspelt_vlfau_global_caption_names_the_key():
    from expvl.configs.schema import VLFAURecipe

    with pytest.raises(ConfigError, match=r"model\.global_caption: unknown value 'au_rul' \(did you mean 'au_rule'"):
        load_config(VLFAURecipe, ["vlfau_synthfacs"], ["model.global_caption=au_rul"])


def test_a_yaml_syntax_error_names_the_file_and_line_through_train_py(tmp_path):
    from train import main

    bad = tmp_path / "experiment.yaml"
    bad.write_text("stage1:\n  max_steps: 5\n  captions: [au_rule, emotion\nstage2:\n  max_steps: 3\n")
    # config_system, which train.py calls first, reads the file before load_config does
    with pytest.raises(ConfigError, match=r"experiment\.yaml:4:\d+: invalid YAML: .*flow sequence at line 3"):
        main(["--config", str(bad)])
    with pytest.raises(ConfigError, match=r"experiment\.yaml:4:\d+: invalid YAML"):
        load_config(RunConfig, [bad])


def _record(**captions) -> Record:
    return Record(id="r1", image="r1.png", source="synthfacs", split="train", aus={"AU12": 1},
                  emotion="happiness", captions=captions)


def test_collate_refuses_an_unknown_kind_instead_of_dropping_it():
    from expvl.datamodules.collate import caption_samples, vqa_samples

    with pytest.raises(ValueError, match=r"caption kinds: unknown value 'emotoin' \(did you mean 'emotion'\?\)"):
        caption_samples(["au_rule", "emotoin"])
    with pytest.raises(ValueError, match=r"VQA types: unknown value 'q4'.*allowed: q1, q2, q3, emotion"):
        vqa_samples(["q1", "q4"])
    record = _record(au_rule="Lip corners pulled up.", emotion="The face shows happiness.")
    assert [s["kind"] for s in caption_samples(["emotion", "fused", "au_rule"])(record)] == ["emotion", "au_rule"]


def test_au_llm_asked_of_data_synthesized_without_the_llm_fails_when_the_stream_indexes(tmp_path):
    from expvl.datamodules.collate import caption_samples
    from expvl.datamodules.stream import StreamDataset

    expand = caption_samples(["au_rule", "au_llm"])  # configs/recipes/expblip_stage1.yaml (AU-BLIP)
    with_llm = _record(au_rule="Lip corners pulled up.", au_llm="The lip corners are raised.")
    assert [s["kind"] for s in expand(with_llm)] == ["au_rule", "au_llm"]
    emotion_only = Record(id="r2", image="r2.png", source="affectnet", split="train", emotion="happiness",
                          captions={"emotion": "The face shows happiness."})
    assert expand(emotion_only) == []  # no AU labels: no AU caption of either kind to ask for
    shard = tmp_path / "train-00000.jsonl"
    shard.write_text(_record(au_rule="Lip corners pulled up.").to_json() + "\n")
    with pytest.raises(ValueError, match=r"record 'r1' has caption 'au_rule' but not 'au_llm'.*text\.llm\.enabled"):
        StreamDataset([shard], expand=expand)


def test_train_py_reports_a_config_typo_without_a_traceback():
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "train.py", "stage1.max_stepz=5"], cwd=repo, capture_output=True, check=False,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert "config error" in proc.stderr and "max_stepz" in proc.stderr and "max_steps" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- a recipe never starts a frozen part from random weights by accident ----------------------------------

RECIPE = [CONFIG_DIR / "recipes" / "_blip2_vitg.yaml", CONFIG_DIR / "recipes" / "expblip_stage1.yaml"]


def test_an_unset_variable_is_named_instead_of_an_empty_path(monkeypatch):
    for var in ("EVA_VIT_G", "BLIP2_STAGE1", "DATA_ROOT", "BERT_VOCAB"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"data\.root: .*environment variable DATA_ROOT is not set"):
        load_config(RunConfig, RECIPE)
    monkeypatch.setenv("DATA_ROOT", "/data")
    monkeypatch.setenv("BERT_VOCAB", "/vocab.txt")
    with pytest.raises(ConfigError, match=r"model\.vision\.pretrained: the frozen image encoder would start "
                                          r"from random weights.*EVA_VIT_G is not set"):
        load_config(RunConfig, RECIPE)
    monkeypatch.setenv("EVA_VIT_G", "/eva_vit_g.pth")
    with pytest.raises(ConfigError, match=r"the Q-Former would start from random weights.*BLIP2_STAGE1 is not set"):
        load_config(RunConfig, RECIPE)
    monkeypatch.setenv("BLIP2_STAGE1", "/blip2_pretrained.pth")
    cfg = load_config(RunConfig, RECIPE)
    assert cfg.model.vision.pretrained == "/eva_vit_g.pth" and cfg.pretrained.lavis_checkpoint == "/blip2_pretrained.pth"


def test_random_weights_only_when_the_config_says_so(monkeypatch):
    monkeypatch.delenv("EVA_VIT_G", raising=False)
    monkeypatch.delenv("BLIP2_STAGE1", raising=False)
    base = ["data.root=/data", "pretrained.qformer_vocab=/vocab.txt"]
    with pytest.raises(ConfigError, match="frozen image encoder"):  # an override beats the file's variable
        load_config(RunConfig, RECIPE, [*base, "random_init=[qformer]"])
    cfg = load_config(RunConfig, RECIPE, [*base, "random_init=[vision,qformer]"])
    assert cfg.random_init == ["vision", "qformer"]
    with pytest.raises(ConfigError, match=r"random_init: \['llm'\] are not parts"):
        load_config(RunConfig, RECIPE, [*base, "random_init=[vision,qformer,llm]"])
    # the embedded default builds its own parts: nothing to name
    assert load_config(RunConfig, ["tiny"]).model.vision.pretrained == ""
