"""Moving weights between stages and formats: HF export round trip, stage-to-stage initialisation."""

import pytest
import torch

from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.convert.hf_export import save_hf_llama
from expvl.models.convert.llama import load_hf_llama
from expvl.models.convert.weights import CheckpointError
from expvl.models.llm import LLaMA, LLMConfig
from expvl.models.optim import OptimConfig
from expvl.models.qformer import QFormerConfig
from expvl.models.vision import VisionConfig
from expvl.training.checkpoints import init_from_checkpoints
from expvl.training.lit_blip2 import LitLanguage, LitPretrain
from expvl.training.stages import trainable

QF = QFormerConfig.from_name("tiny", vocab_size=40)
LLM = LLMConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


def test_hf_export_round_trip(tmp_path):
    llm = LLaMA(LLM).eval()
    loaded = load_hf_llama(save_hf_llama(llm, tmp_path / "hf")).eval()
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(loaded(input_ids=ids)["logits"], llm(input_ids=ids)["logits"])
    assert loaded.config.kv_heads == 2


def _save(lit, path):
    torch.save({"state_dict": lit.state_dict()}, path)
    return path


def _blip(stage, vision):
    return Blip2(Blip2Config(stage=stage, vision=VisionConfig.from_name("tiny-vit"), qformer=QF,
                             llm=None if stage == "pretrain" else LLM), vision=vision, llm=None)


def test_stage2_takes_query_side_from_stage1_and_stage3_takes_both(tmp_path):
    m1 = _blip("pretrain", None)
    ck1 = _save(LitPretrain(m1, trainable=trainable(m1), optim=OptimConfig(), total_steps=1, dec_token_id=4,
                                  pad_token_id=0), tmp_path / "1.ckpt")
    m2 = _blip("caption", m1.vision)
    loaded = init_from_checkpoints(m2, [(ck1, ("ln_vision.", "qformer."))])
    assert "qformer.query_tokens" in loaded and not any("word_embeddings" in k for k in loaded)
    torch.testing.assert_close(m2.qformer.query_tokens, m1.qformer.query_tokens)
    with torch.no_grad():
        m2.llm_proj.weight.add_(1.0)
        m2.qformer.query_tokens.add_(1.0)
    ck2 = _save(LitLanguage(m2, trainable=trainable(m2), optim=OptimConfig(), total_steps=1), tmp_path / "2.ckpt")
    m3 = _blip("instruct", m1.vision)
    init_from_checkpoints(m3, [(ck1, ("ln_vision.", "qformer.")), (ck2, ("ln_vision.", "qformer.", "llm_proj."))])
    torch.testing.assert_close(m3.qformer.query_tokens, m2.qformer.query_tokens)  # later source wins
    torch.testing.assert_close(m3.llm_proj.weight, m2.llm_proj.weight)
    torch.testing.assert_close(m3.qformer.bert.embeddings.word_embeddings.weight,
                               m1.qformer.bert.embeddings.word_embeddings.weight)  # text parts from stage 1


def test_stage_init_errors(tmp_path):
    m2 = _blip("caption", None)
    ck2 = _save(LitLanguage(m2, trainable=trainable(m2), optim=OptimConfig(), total_steps=1), tmp_path / "2.ckpt")
    m3 = _blip("instruct", m2.vision)
    with pytest.raises(CheckpointError, match="word_embeddings"):  # stage 2 has no text parts to give
        init_from_checkpoints(m3, [(ck2, ("qformer.",))])
    bad = {"state_dict": {"model.llm_proj.weight": torch.zeros(3, 3)}}
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="llm_proj.weight has shape"):
        init_from_checkpoints(m2, [(tmp_path / "bad.ckpt", ("llm_proj.",))])
    (tmp_path / "trunc.ckpt").write_bytes((tmp_path / "2.ckpt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="trunc.ckpt"):
        init_from_checkpoints(m2, [(tmp_path / "trunc.ckpt", ("llm_proj.",))])
