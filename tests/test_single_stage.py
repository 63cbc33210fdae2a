"""`train.py mode=stage` (single_stage.py): the LLM vocabulary grown in place."""

import pytest
import torch

from models.llm import LLaMA, LLMConfig
from single_stage import resize_vocab

# ---- resize_vocab: grow embed_tokens / lm_head in place --------------------------------------------------

def _old_resize(llm: LLaMA, vocab_size: int) -> LLaMA:
    """The previous implementation (a second LLaMA, then copies): the reference for the result."""
    from dataclasses import replace
    grown = LLaMA(replace(llm.config, vocab_size=vocab_size)).to(llm.model.embed_tokens.weight.dtype)
    state = llm.state_dict()
    with torch.no_grad():
        for key, t in grown.state_dict().items():
            src = state[key]
            if t.shape == src.shape:
                t.copy_(src)
            else:
                t[:src.shape[0]].copy_(src)
                t[src.shape[0]:].copy_(src.float().mean(0, keepdim=True).to(t.dtype))
    return grown


def _tiny_llm(tied: bool, vocab: int = 50) -> LLaMA:
    return LLaMA(LLMConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                           max_seq_len=64, tie_embeddings=tied)).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_resize_vocab_grows_in_place_as_the_rebuild_did(tied, monkeypatch):
    llm = _tiny_llm(tied)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        before = llm(input_ids=ids)["logits"]
    reference = _old_resize(llm, 53).state_dict()
    layers, params = llm.model.layers, {n: p for n, p in llm.named_parameters() if "embed" not in n}
    params.pop("lm_head.weight", None)

    def no_second_model(*a, **k):
        raise AssertionError("resize_vocab built another LLaMA")

    monkeypatch.setattr(LLaMA, "__init__", no_second_model)
    out = resize_vocab(llm, 53)
    monkeypatch.undo()

    assert out is llm and llm.model.layers is layers  # the same model, grown; nothing else rebuilt
    for name, p in llm.named_parameters():
        if name in params:
            assert p is params[name], name
    assert llm.config.vocab_size == 53 and llm.model.embed_tokens.num_embeddings == 53
    assert (llm.lm_head is None) == tied  # tied stays tied: the head is the embedding matrix
    if not tied:
        assert llm.lm_head.out_features == 53 and llm.lm_head.weight.shape == (53, 32)
    state = llm.state_dict()
    assert state.keys() == reference.keys()
    for key in state:
        torch.testing.assert_close(state[key], reference[key], rtol=0, atol=0, msg=key)
    with torch.no_grad():
        after = llm(input_ids=ids)["logits"]
    assert after.shape[-1] == 53
    torch.testing.assert_close(after[..., :50], before, rtol=0, atol=0)  # old tokens: logits unchanged
    emb = llm.model.embed_tokens.weight
    torch.testing.assert_close(emb[50:], emb[:50].mean(0, keepdim=True).expand(3, -1))


def test_resize_vocab_keeps_dtype_grad_flag_and_a_shared_head():
    llm = _tiny_llm(tied=False).half()
    llm.lm_head.weight = llm.model.embed_tokens.weight  # a head tied by sharing the Parameter
    llm.model.embed_tokens.weight.requires_grad_(False)
    resize_vocab(llm, 51)
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    assert llm.model.embed_tokens.weight.dtype == torch.float16 and not llm.model.embed_tokens.weight.requires_grad
    assert resize_vocab(llm, 51) is llm  # no change when the sizes agree
    with pytest.raises(ValueError, match="smaller"):
        resize_vocab(llm, 40)
