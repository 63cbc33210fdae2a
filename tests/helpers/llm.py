"""A tiny random transformers LLaMA and ours loaded from its folder, left-padded ids, one CPU thread.

Shared by tests/models/test_llm.py, test_convert_llama.py and test_generation.py. `single_thread`
is an autouse module fixture: a test module applies it by importing it (`# noqa: F401`).
"""

import warnings

import pytest
import torch

from expvl.models.convert.llama import load_hf_llama

VOCAB = 61


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matrices: one thread is ~100x faster than OpenMP threads spinning on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hf_tiny(tmp_path, seed=0, **overrides):
    """A tiny random HF LlamaForCausalLM saved with save_pretrained, and ours loaded from that folder."""
    import transformers  # the test-only oracle: every caller has skipped already where it is absent

    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              initializer_range=0.2)
    kw.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
        hf.save_pretrained(tmp_path)
    return hf, load_hf_llama(tmp_path).eval()


def left_padded(B=3, T=9, pads=(3, 0, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask
