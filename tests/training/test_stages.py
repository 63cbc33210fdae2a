"""The stage table (training/stages.py STAGES) is complete: against the schema, the model, and itself."""

import pytest

from expvl.configs import ConfigError, load_config
from expvl.configs.schema import RunConfig, StageConfig
from expvl.models import blip2
from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.llm import LLMConfig
from expvl.models.lora import LORA_MARKER
from expvl.models.qformer import QFormerConfig
from expvl.models.vision import VisionConfig
from expvl.training.lit_blip2 import LitLanguage, LitPretrain
from expvl.training.stages import STAGES, stage_config_keys, trainable

QF = QFormerConfig.from_name("tiny", vocab_size=40)
LLM = LLMConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


class _Tok:  # what the factories read of a tokenizer
    dec_id, pad_id, bos_id, eos_id, vocab_size = 4, 0, 1, 2, 40


def _model(stage: str) -> Blip2:
    needs_llm = STAGES[stage].needs_llm
    return Blip2(Blip2Config(stage=stage, vision=VisionConfig.from_name("tiny-vit"), qformer=QF,
                             llm=LLM if needs_llm else None, embed_dim=16))


def test_one_row_per_model_stage_and_per_stage_section_of_the_schema():
    assert list(STAGES) == list(blip2.STAGES)  # names and order: what Blip2Config.stage accepts
    assert sorted(s.config_key for s in STAGES.values()) == sorted(stage_config_keys()) == ["stage1", "stage2",
                                                                                           "stage3"]
    assert len({s.folder for s in STAGES.values()}) == len(STAGES)
    cfg = RunConfig()
    assert all(isinstance(s.settings(cfg), StageConfig) for s in STAGES.values())


def test_the_schema_takes_exactly_the_table_s_stage_names():
    for name in STAGES:
        assert load_config(RunConfig, [], [f"stage={name}"]).stage == name
    with pytest.raises(ConfigError, match="stage must be"):
        load_config(RunConfig, [], ["stage=finetune"])


@pytest.mark.parametrize("name", list(STAGES))
def test_trains_covers_every_non_frozen_part_and_names_only_real_ones(name):
    stage, model = STAGES[name], _model(name)
    params = [n for n, _ in model.named_parameters()]
    for prefix in stage.trains:
        assert any(n.startswith(prefix) for n in params), f"{name}: {prefix!r} names no parameter"
    untrained = {n.split(".")[0] for n in params if not n.startswith(stage.trains)}
    assert untrained <= {"vision", "llm"}  # only the frozen encoder and LLM stay behind
    assert set(stage.hands_on) <= set(stage.trains)
    unfrozen = Blip2(Blip2Config(stage=name, vision=VisionConfig.from_name("tiny-vit", freeze=False), qformer=QF,
                                 llm=LLM if stage.needs_llm else None, embed_dim=16))
    assert trainable(unfrozen).prefixes == stage.trains + ("vision.",) and trainable(model).prefixes == stage.trains
    assert trainable(model).markers == (LORA_MARKER,)  # LoRA adapters train wherever a stage adds them


def test_each_stage_inits_from_earlier_ones_only():
    order = list(STAGES)
    for i, stage in enumerate(STAGES.values()):
        assert all(order.index(s) < i for s in stage.init_from), stage.name


@pytest.mark.parametrize("name", list(STAGES))
def test_the_factories_build_the_stage_s_samples_collate_and_module(name):
    stage, model, cfg = STAGES[name], _model(name), RunConfig()
    st = stage.settings(cfg)
    lit = stage.module(model, st, {"qformer": _Tok(), "llm": _Tok()})
    assert isinstance(lit, LitPretrain if name == "pretrain" else LitLanguage)
    assert lit.trainable == trainable(model) and lit.total_steps == st.max_steps
    assert callable(stage.samples(st)) and callable(stage.collate({"qformer": _Tok(), "llm": _Tok()}, cfg.text, None))
