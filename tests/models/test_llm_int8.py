"""models/llm_int8.py: int8 linears for a frozen LLM's CPU inference are close to fp32 and decode the same."""

import pytest
import torch
from torch import nn

from expvl.models.generation import GenerationConfig, generate
from expvl.models.llm import LLaMA, LLMConfig
from expvl.models.llm_int8 import int8_linears


def _trained_llm(tie: bool) -> LLaMA:
    """A tiny LLaMA that has learned to continue a fixed cycle of tokens (large logit margins)."""
    torch.manual_seed(0)
    llm = LLaMA(LLMConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                          max_seq_len=128, tie_embeddings=tie))
    cycle = torch.tensor([5, 9, 13, 17, 21, 25, 29, 33, 37, 41])
    opt = torch.optim.AdamW(llm.parameters(), lr=3e-3)
    for step in range(150):
        start = torch.randint(0, 10, (8,))
        ids = torch.stack([cycle[(s + torch.arange(24)) % 10] for s in start])
        logits = llm(input_ids=ids[:, :-1])["logits"]
        loss = nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss < 0.1, loss
    return llm.eval()


@pytest.mark.parametrize("tie", [False, True])
def test_int8_logits_are_close_and_greedy_tokens_equal(tie):
    llm = _trained_llm(tie)
    q = int8_linears(llm)
    # every decoder / head linear is quantized; the original keeps its float layers
    assert not any(type(m) is nn.Linear for m in q.modules())
    assert sum(type(m) is nn.Linear for m in llm.modules()) == 2 * 7 + (0 if tie else 1)
    ids = torch.tensor([[5, 9, 13, 17], [25, 29, 33, 37]])
    with torch.no_grad():
        ref, got = llm(input_ids=ids)["logits"], q(input_ids=ids)["logits"]
    assert (got - ref).abs().max() < 0.1 * ref.std()  # int8 rounding, not a different model
    assert (got - ref).abs().max() > 0  # and it really is quantized
    cfg = GenerationConfig(max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    mask = torch.ones_like(ids)
    a = generate(llm, input_ids=ids, attention_mask=mask, config=cfg)["sequences"]
    b = generate(q, input_ids=ids, attention_mask=mask, config=cfg)["sequences"]
    assert torch.equal(a, b)


def test_int8_refuses_what_it_cannot_quantize():
    llm = LLaMA(LLMConfig(vocab_size=32, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, max_seq_len=32))
    with pytest.raises(ValueError, match="fp32"):
        int8_linears(llm.to(torch.bfloat16))
