"""The BLIP-2 composition and stage modules: gradients reach exactly what trains, checkpoints are trimmed."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.llm import LLMConfig
from expvl.models.optim import OptimConfig
from expvl.models.qformer import QFormerConfig
from expvl.models.vision import VisionConfig
from expvl.training.lit_base import freeze
from expvl.training.lit_blip2 import LitLanguage, LitPretrain
from expvl.training.stages import trainable

QF = QFormerConfig.from_name("tiny", hidden_dropout=0.0, attention_dropout=0.0, vocab_size=40)
LLM = LLMConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=128)


def _model(stage: str, freeze_vision: bool = True) -> Blip2:
    vision = VisionConfig.from_name("tiny-vit", freeze=freeze_vision)
    return Blip2(Blip2Config(stage=stage, vision=vision, qformer=QF, llm=None if stage == "pretrain" else LLM,
                             embed_dim=16))


def _text(B=4, T=6, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -2:] = 0
    ids[0, -2:] = 0
    return ids, mask


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def test_stage1_gradients_reach_only_trainable_parts():
    model = _model("pretrain")
    freeze(model, trainable(model))
    images = torch.randn(4, 3, 64, 64)
    ids, mask = _text()
    out = model.stage1_losses(model.encode_image(images), ids, mask, dec_token_id=4, pad_token_id=0)
    out["loss"].backward()
    for name, g in _grads(model).items():
        if name.startswith("vision."):
            assert g is None, name
    for name in ("ln_vision.weight", "qformer.query_tokens", "vision_proj.weight", "text_proj.weight",
                 "itm_head.weight", "temp", "qformer.cls.predictions.transform.dense.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert set(out) >= {"loss_itc", "loss_itm", "loss_itg"}


@pytest.mark.parametrize("stage", ["caption", "instruct"])
def test_language_stages_train_qformer_and_projection_not_llm(stage):
    model = _model(stage)
    counts = freeze(model, trainable(model))
    assert 0 < counts["trainable"] < counts["total"]
    embeds = model.encode_image(torch.randn(3, 3, 64, 64))
    llm_ids = torch.randint(3, 50, (3, 7))
    labels = llm_ids.clone()
    labels[:, :3] = -100
    qf_ids, qf_mask = _text(B=3) if stage == "instruct" else (None, None)
    out = model.lm_loss(embeds, llm_ids, torch.ones_like(llm_ids), labels, instruction_ids=qf_ids,
                        instruction_mask=qf_mask)
    out["loss"].backward()
    grads = _grads(model)
    assert all(g is None for n, g in grads.items() if n.startswith(("llm.", "vision."))), "frozen parts got gradients"
    assert grads["llm_proj.weight"].abs().sum() > 0
    assert grads["qformer.query_tokens"].abs().sum() > 0
    if stage == "instruct":  # the instruction reaches the Q-Former's text embeddings
        assert grads["qformer.bert.embeddings.word_embeddings.weight"].abs().sum() > 0
    else:
        assert not any("word_embeddings" in n for n in grads)


def test_lm_loss_equals_the_loss_over_full_llm_logits():
    """Blip2.lm_loss computes logits at the answer positions only; the loss is the full-logit one."""
    model = _model("instruct").eval()
    embeds = model.encode_image(torch.randn(3, 3, 64, 64))
    ids = torch.randint(3, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    qf_ids, qf_mask = _text(B=3)
    with torch.no_grad():
        got = model.lm_loss(embeds, ids, mask, labels, instruction_ids=qf_ids, instruction_mask=qf_mask)["loss"]
        prompt = model.soft_prompt(embeds, qf_ids, qf_mask)
        inputs = torch.cat([prompt, model.llm.embed(ids)], 1)  # [soft prompt | text], by hand
        full_mask = torch.cat([torch.ones(3, prompt.shape[1], dtype=mask.dtype), mask], 1)
        logits = model.llm(inputs_embeds=inputs, attention_mask=full_mask)["logits"]  # (B, Q + T, V)
        full_labels = torch.cat([torch.full((3, prompt.shape[1]), -100), labels], 1)
        want = F.cross_entropy(logits[:, :-1].reshape(-1, 50), full_labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, want)


def test_unfrozen_encoder_trains_in_language_stage():
    model = _model("caption", freeze_vision=False)
    freeze(model, trainable(model))
    embeds = model.encode_image(torch.randn(2, 3, 64, 64))
    ids = torch.randint(3, 50, (2, 5))
    model.lm_loss(embeds, ids, torch.ones_like(ids), ids)["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("vision."))


def test_checkpoint_holds_only_trained_weights_and_loads_strictly():
    model = _model("caption")
    lit = LitLanguage(model, trainable=trainable(model), optim=OptimConfig(), total_steps=10)
    sd = lit.state_dict()
    assert sd and all(k.startswith(("model.ln_vision.", "model.qformer.", "model.llm_proj.")) for k in sd)
    assert not any(k.startswith(("model.llm.", "model.vision.")) for k in sd)
    other = _model("caption")
    fresh = LitLanguage(other, trainable=trainable(other), optim=OptimConfig(), total_steps=10)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.model.llm_proj.weight, lit.model.llm_proj.weight)
    bad = dict(sd)
    bad.pop("model.llm_proj.weight")
    with pytest.raises(RuntimeError, match="missing .*llm_proj.weight"):
        fresh.load_state_dict(bad)


def test_running_loss_norm_weighs_tokens_as_mixed_batches_do():
    """A batch of one-token answers after a batch of five-token answers: with "running" each batch's
    token sum is divided by the mean count so far (6 tokens), not by its own (2 or 10)."""
    model = _model("caption").eval()
    running = LitLanguage(model, trainable=trainable(model), optim=OptimConfig(), total_steps=10, loss_norm="running")
    per_batch = LitLanguage(model, trainable=trainable(model), optim=OptimConfig(), total_steps=10)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=g)
    batches = []
    for answer in (5, 1):
        ids = torch.randint(3, 50, (2, 8), generator=g)
        labels = ids.clone()
        labels[:, : 8 - answer] = -100
        batches.append({"images": images, "llm_ids": ids, "llm_mask": torch.ones_like(ids), "labels": labels})
    with torch.no_grad():
        got = [running._step(b, "train")["loss"] for b in batches]
        mean = [per_batch._step(b, "train")["loss"] for b in batches]
    torch.testing.assert_close(got[0], mean[0])  # first batch: the mean so far is its own count
    torch.testing.assert_close(got[1], mean[1] * 2 / 6)  # 2 tokens, divided by (10 + 2) / 2
    assert (running.seen_tokens, running.seen_batches) == (12, 2)
    with torch.no_grad():  # validation uses the training mean and does not update it
        torch.testing.assert_close(running._step(batches[1], "val")["loss"], mean[1] * 2 / 6)
    assert (running.seen_tokens, running.seen_batches) == (12, 2)
    ckpt = {}
    running.on_save_checkpoint(ckpt)
    resumed = LitLanguage(model, trainable=trainable(model), optim=OptimConfig(), total_steps=10, loss_norm="running")
    resumed.on_load_checkpoint(ckpt)
    assert (resumed.seen_tokens, resumed.seen_batches) == (12, 2)
    with pytest.raises(ValueError, match="loss_norm 'tokens'"):
        LitLanguage(model, trainable=trainable(model), optim=OptimConfig(), total_steps=10, loss_norm="tokens")


def test_non_finite_loss_stops_with_message():
    model = _model("pretrain")
    lit = LitPretrain(model, trainable=trainable(model), optim=OptimConfig(), total_steps=10, dec_token_id=4,
                      pad_token_id=0)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        lit.check_finite({"loss": torch.tensor(float("nan")), "loss_itc": torch.tensor(1.0)})


def test_generate_and_score_shapes_with_left_padded_prompts():
    model = _model("instruct").eval()
    from expvl.models.generation import GenerationConfig
    embeds = model.encode_image(torch.randn(2, 3, 64, 64))
    qf_ids, qf_mask = _text(B=2)
    prompt = torch.tensor([[0, 0, 1, 7], [1, 8, 9, 10]])
    pmask = (prompt != 0).long()
    seq = model.generate(embeds, prompt, pmask, GenerationConfig(max_new_tokens=5, eos_token_id=2, pad_token_id=0),
                         instruction_ids=qf_ids, instruction_mask=qf_mask)
    assert seq.shape[0] == 2 and seq.shape[1] <= 5
    scores = model.score_answers(embeds, prompt, pmask, [[11, 2], [12, 2]], instruction_ids=qf_ids,
                                 instruction_mask=qf_mask)
    assert scores.shape == (2, 2) and (scores <= 0).all()
    # the first row's answer does not depend on how much left padding it had
    one = model.score_answers(embeds[:1], prompt[:1, 2:], pmask[:1, 2:], [[11, 2], [12, 2]],
                              instruction_ids=qf_ids[:1], instruction_mask=qf_mask[:1])
    torch.testing.assert_close(one, scores[:1], atol=1e-4, rtol=1e-4)


def test_stage_config_errors():
    with pytest.raises(ValueError, match="needs an LLM config"):
        Blip2Config(stage="caption", llm=None)
    with pytest.raises(ValueError, match="stage must be one of"):
        Blip2Config(stage="finetune")
    assert replace(Blip2Config(), stage="caption", llm=LLM).qformer_for_stage.text_input is False
