"""The stand-ins for downloaded weights: the encoder and the LLM learn what they are trained on."""

import torch

from expvl.models.llm import LLaMA, LLMConfig
from expvl.models.optim import OptimConfig
from expvl.models.vision import VisionConfig, VisionEncoder
from expvl.training.lit_bootstrap import LitCausalLM, LitEncoderPretrain


def _fit(lit, batch, steps):
    opt = lit.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(steps):
        loss = lit._step(batch, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def test_encoder_heads_read_every_token_and_the_loss_falls(monkeypatch):
    enc = VisionEncoder(VisionConfig.from_name("tiny-conv", freeze=False))
    lit = LitEncoderPretrain(enc, num_aus=3, num_emotions=8, optim=OptimConfig(lr=3e-3, warmup_steps=0),
                             total_steps=30)
    monkeypatch.setattr(lit, "log_dict", lambda *a, **k: None)
    assert lit.au_head.in_features == enc.width * enc.num_tokens  # position-aware, not a mean
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(8, 3, 64, 64, generator=g), "aus": torch.randint(0, 2, (8, 3)).float(),
             "au_mask": torch.ones(8, 3, dtype=torch.bool), "emotion": torch.tensor([0, 1, 2, 3, -1, 5, 6, 7])}
    losses = _fit(lit, batch, 25)
    assert losses[-1] < 0.5 * losses[0]


def test_causal_lm_learns_a_repeated_sentence(monkeypatch):
    llm = LLaMA(LLMConfig(vocab_size=30, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=32))
    lit = LitCausalLM(llm, optim=OptimConfig(lr=1e-2, warmup_steps=0), total_steps=40)
    monkeypatch.setattr(lit, "log", lambda *a, **k: None)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 2, 0], [1, 5, 6, 7, 8, 9, 2, 0]])
    losses = _fit(lit, {"input_ids": ids, "attention_mask": (ids != 0).long()}, 40)
    assert losses[-1] < 0.2 < losses[0]
