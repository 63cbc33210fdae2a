"""models/generation.py: token identity with transformers' generate (greedy, beam), batching invariance,
the processors and stopping rules, sampling, and candidate scoring."""

import warnings

import pytest
import torch

from expvl.models.generation import GenerationConfig, generate, repetition_penalty, score_candidates
from tests.helpers.llm import VOCAB, hf_tiny, left_padded, single_thread  # noqa: F401  (autouse fixture)

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return hf_tiny(tmp_path_factory.mktemp("gen"), num_key_value_heads=2)


def hf_generate(hf, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(do_sample=False, pad_token_id=1, **kw)


def likely_eos(model, ids, mask):
    """Two ids the model really produces early, so that EOS ends some hypotheses."""
    cfg = GenerationConfig(max_new_tokens=6)
    g = generate(model, input_ids=ids, attention_mask=mask, config=cfg)["sequences"]
    return [int(g[0, 3]), int(g[1, 2])]


SETTINGS = [
    dict(num_beams=1),
    dict(num_beams=1, min_new_tokens=4),
    dict(num_beams=3, length_penalty=0.6),
    dict(num_beams=3, length_penalty=2.0, num_return_sequences=2),
    dict(num_beams=3, length_penalty=-0.5, early_stopping=True),
    dict(num_beams=3, repetition_penalty=1.3, min_new_tokens=3),
]


@pytest.mark.parametrize("prompt", ["input_ids", "inputs_embeds"])
def test_token_identical_to_transformers(models, prompt):
    hf, ours = models
    ids, mask = left_padded(T=6, pads=(2, 0, 4))
    eos = likely_eos(ours, ids, mask)
    ended_early = 0
    for kw in SETTINGS:
        if prompt == "inputs_embeds" and "repetition_penalty" in kw:
            # HF applies its prompt-padding offsets to the *generated* ids when the prompt has no ids
            # (transformers 5.23); without padding both sides penalise the generated ids only
            p_ids, p_mask = ids[1:2].expand(3, -1), mask[1:2].expand(3, -1)
        else:
            p_ids, p_mask = ids, mask
        cfg = GenerationConfig(max_new_tokens=10, eos_token_id=eos, pad_token_id=1, **kw)
        if prompt == "input_ids":
            out = generate(ours, input_ids=p_ids, attention_mask=p_mask, config=cfg)["sequences"]
            ref = hf_generate(hf, input_ids=p_ids, attention_mask=p_mask, max_new_tokens=10, eos_token_id=eos,
                              **kw)[:, p_ids.shape[1]:]
        else:
            emb = ours.embed(p_ids).detach()
            out = generate(ours, inputs_embeds=emb, attention_mask=p_mask, config=cfg)["sequences"]
            ref = hf_generate(hf, inputs_embeds=emb, attention_mask=p_mask, max_new_tokens=10,
                              eos_token_id=eos,
                              **kw)
        assert torch.equal(out, ref), (kw, out, ref)
        ended_early += int((out == 1).any())
    assert ended_early >= 3  # EOS really ended hypotheses, so the finishing logic was compared too


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_left_padding_equals_one_by_one(models, num_beams):
    _, model = models
    ids, mask = left_padded(T=8, pads=(5, 0, 2))
    cfg = GenerationConfig(max_new_tokens=8, num_beams=num_beams, length_penalty=0.8, pad_token_id=1,
                           eos_token_id=likely_eos(model, ids, mask))
    batched = generate(model, input_ids=ids, attention_mask=mask, config=cfg)["sequences"]
    for b in range(3):
        real = ids[b:b + 1, mask[b].bool()]
        single = generate(model, input_ids=real, config=cfg)["sequences"][0]
        row = batched[b]
        assert torch.equal(row[:len(single)], single)
        assert (row[len(single):] == 1).all()


def test_repetition_penalty_rule():
    scores = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[0, 1, 4, 1]])  # 4 == vocab size: "nothing" (masked padding)
    out = repetition_penalty(scores, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))


def test_repetition_penalty_prevents_repeats(models):
    _, model = models
    ids, _ = left_padded(B=1, T=4, pads=(0,))
    plain = generate(model, input_ids=ids, config=GenerationConfig(max_new_tokens=12))["sequences"][0]
    seq = torch.cat([ids[0], plain])
    assert len(set(seq.tolist())) < len(seq)  # the random model does repeat itself...
    out = generate(model, input_ids=ids, config=GenerationConfig(max_new_tokens=12, repetition_penalty=50.0))
    seq = torch.cat([ids[0], out["sequences"][0]]).tolist()
    assert len(set(seq)) == len(seq)  # ...and a strong penalty stops it, prompt ids included


def test_eos_min_new_tokens_and_padding(models):
    _, model = models
    ids, mask = left_padded(T=5, pads=(1, 0, 0))
    free = generate(model, input_ids=ids, attention_mask=mask, config=GenerationConfig(max_new_tokens=6))
    eos = int(free["sequences"][0, 0])  # row 0 would end at once
    cfg = GenerationConfig(max_new_tokens=6, eos_token_id=eos, pad_token_id=1)
    out = generate(model, input_ids=ids, attention_mask=mask, config=cfg)["sequences"]
    assert out[0, 0] == eos and (out[0, 1:] == 1).all()
    cfg = GenerationConfig(max_new_tokens=6, eos_token_id=eos, pad_token_id=1, min_new_tokens=3)
    out = generate(model, input_ids=ids, attention_mask=mask, config=cfg)["sequences"]
    assert (out[:, :3] != eos).all() and out.shape[1] > 3


def test_stop_strings_and_stop_sequences(models):
    _, model = models
    ids, mask = left_padded(T=5, pads=(1, 0, 2))
    decode = lambda toks: "".join(chr(0x400 + t) for t in toks)  # noqa: E731  one char per id
    free = generate(model, input_ids=ids, attention_mask=mask, config=GenerationConfig(max_new_tokens=8))
    g = free["sequences"]
    stop = g[0, 2:4].tolist()  # row 0 must stop after 4 tokens (or earlier if the pair occurs before)
    for cfg, kw in [(GenerationConfig(max_new_tokens=8, pad_token_id=1, stop_strings=[decode(stop)]),
                     dict(decode=decode)),
                    (GenerationConfig(max_new_tokens=8, pad_token_id=1, stop_token_sequences=[stop]), {})]:
        out = generate(model, input_ids=ids, attention_mask=mask, config=cfg, **kw)["sequences"]
        for row, ref in zip(out.tolist(), g.tolist()):
            ends = [i + 2 for i in range(7) if ref[i:i + 2] == stop]
            n = ends[0] if ends else 8
            assert row[:n] == ref[:n] and all(t == 1 for t in row[n:])
        assert out[0, 4:].eq(1).all()
    with pytest.raises(ValueError, match="decode"):
        generate(model, input_ids=ids, config=GenerationConfig(stop_strings=["x"]))


def test_sampling(models):
    _, model = models
    ids, mask = left_padded(T=5, pads=(1, 0, 2))
    greedy = generate(model, input_ids=ids, attention_mask=mask, config=GenerationConfig(max_new_tokens=6))
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)):
        s = generate(model, input_ids=ids, attention_mask=mask, generator=torch.Generator().manual_seed(0),
                     config=GenerationConfig(max_new_tokens=6, do_sample=True, **kw))
        assert torch.equal(s["sequences"], greedy["sequences"]), kw
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, top_k=0, temperature=2.0, num_return_sequences=4)
    a, b = (generate(model, input_ids=ids, attention_mask=mask, config=cfg,
                     generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert a["sequences"].shape == (12, 6) and torch.equal(a["sequences"], b["sequences"])
    assert len({tuple(r) for r in a["sequences"][:4].tolist()}) > 1  # samples of one prompt differ
    beam_sample = GenerationConfig(max_new_tokens=5, do_sample=True, num_beams=3, top_p=0.9,
                                   num_return_sequences=2)
    out = generate(model, input_ids=ids, attention_mask=mask, config=beam_sample,
                   generator=torch.Generator().manual_seed(0))
    assert out["sequences"].shape == (6, 5) and out["scores"].shape == (6,)


def test_score_candidates_equals_full_forward(models):
    _, model = models
    ids, mask = left_padded(T=6, pads=(2, 0, 3))
    emb = model.embed(ids).detach()
    cands = [[5], [7, 8, 9], [11, 5]]
    got = score_candidates(model, inputs_embeds=emb, attention_mask=mask, candidates=cands)
    assert got.shape == (3, 3)
    for b in range(3):
        for c, cand in enumerate(cands):
            full = torch.cat([emb[b:b + 1], model.embed(torch.tensor([cand])).detach()], 1)
            m = torch.cat([mask[b:b + 1], torch.ones(1, len(cand), dtype=torch.long)], 1)
            with torch.no_grad():
                logp = model(inputs_embeds=full, attention_mask=m)["logits"].log_softmax(-1)[0]
            ref = sum(logp[6 + i - 1, t] for i, t in enumerate(cand))
            torch.testing.assert_close(got[b, c], ref, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="left-padded"):
        score_candidates(model, inputs_embeds=emb, attention_mask=mask.flip(1), candidates=cands)
    with pytest.raises(ValueError, match="non-empty"):
        score_candidates(model, inputs_embeds=emb, attention_mask=mask, candidates=[[]])


def test_config_validation():
    with pytest.raises(ValueError, match="num_return_sequences"):
        GenerationConfig(num_beams=2, num_return_sequences=3)
    assert GenerationConfig(eos_token_id=2).eos_ids == [2]
    assert GenerationConfig(eos_token_id=[2, 13]).eos_ids == [2, 13]
    assert VOCAB > 13
