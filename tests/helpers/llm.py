"""A tiny random transformers LLaMA (or Mistral / Qwen2 / Qwen3) and ours loaded from its folder,
left-padded ids, one CPU thread.

Shared by tests/models/test_llm.py, test_convert_llama.py, test_generation.py and test_llm_families.py.
`single_thread` is an autouse module fixture: a test module applies it by importing it (`# noqa: F401`).
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


# the transformers config of every tiny oracle model here (overridden per test)
TINY_HF = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)


def hf_tiny(tmp_path, seed=0, **overrides):
    """A tiny random HF LlamaForCausalLM saved with save_pretrained, and ours loaded from that folder."""
    import transformers  # the test-only oracle: every caller has skipped already where it is absent

    torch.manual_seed(seed)
    kw = {**TINY_HF, **overrides}
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


# model_type -> the transformers class names of its config and causal LM
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def hf_family(tmp_path, model_type, seed=0, **overrides):
    """A tiny random HF causal LM of `model_type` (a key of HF_CLASSES), every weight perturbed (HF
    starts biases at 0 and norms at 1, which would hide a bias or norm we forgot), saved with
    save_pretrained; and ours loaded from that folder through `load_hf_llm`."""
    import transformers

    from expvl.models.convert.hf_llm import load_hf_llm

    config_cls, model_cls = (getattr(transformers, name) for name in HF_CLASSES[model_type])
    torch.manual_seed(seed)
    kw = {**TINY_HF, **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = model_cls(config_cls(**kw)).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        hf.save_pretrained(tmp_path)
    return hf, load_hf_llm(tmp_path).eval()


def train_steps(model, step_loss, steps=120, lr=5e-3):
    """A few AdamW steps on the trainable parts (the decoder frozen, in eval mode); first and last losses."""
    params = [p for n, p in model.named_parameters() if not n.startswith(("llm.", "vision."))]
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(("llm.", "vision.")))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    model.llm.eval()
    losses = []
    for _ in range(steps):
        loss = step_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses[0], losses[-1]
