"""Text generation and candidate scoring for the decoders: `models.llm.LLaMA` and `models.opt.OPT`.

Greedy, multinomial (temperature / top-k / top-p), beam search and beam sampling, all with a KV
cache, batched left-padded prompts given as token ids or as input vectors (the BLIP-2 soft prompt),
repetition penalty, min/max new tokens, EOS ids, stop token sequences and stop strings.
Conventions follow Hugging Face `generate` so that official BLIP-2 / InstructBLIP settings
(LAVIS `Blip2OPT.generate` / `Blip2VicunaInstruct.generate`: beams 5, length_penalty,
repetition_penalty 1.5, top_p 0.9 with the default top_k 50) mean the same thing here:
- logits processors in HF order: repetition penalty, min new tokens, then (sampling only)
  temperature, top-k, top-p; greedy / sampling process raw logits, beam search log-probs;
- repetition penalty covers the non-padding prompt ids and the generated ids (a prompt given only
  as vectors has no ids: then generated ids only);
- beam search is HF's vectorised algorithm (transformers >= 4.50): 2*num_beams candidates per
  step, finished hypotheses scored sum_logprob / new_len ** length_penalty, HF's default
  `early_stopping=False` heuristic for when to stop.
Checked against: transformers 5.23 `GenerationMixin._sample` / `_beam_search`; greedy and beam ids
are token-identical on tiny random models (tests/models/test_generation.py).
Differences on purpose: a finished row is always padded (HF keeps generating when only stop
strings end it), and stop strings need a `decode` callable instead of a tokenizer object.

Generation calls a decoder only through the interface both decoders share (`Decoder` below): every
call passes the whole attention mask (cached + new positions), from which each decoder computes its
own positions (LLaMA's RoPE, OPT's learned table), so nothing here depends on the family.
`DECODERS` maps a decoder config class to its module, for the compositions that build one from a
config (models/blip2.py, models/vlfau.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from expvl.models.kv_cache import KVCache
from expvl.models.llm import LLaMA, LLMConfig
from expvl.models.opt import OPT, OPTConfig

NEG = -1.0e9  # HF's "impossible" beam score; kept identical so ties break the same way


# ----------------------------------------------------------------------------- the decoders

class Decoder(Protocol):
    """What the compositions and generation use of a decoder (models/llm.py LLaMA, models/opt.py OPT).

    `config` has `vocab_size`, `n_layers` (KV cache layers) and `dim` (the width of input vectors, what
    a soft prompt must have); `embed(ids)`, `prefixed(prompt, ids, mask)`, `prefixed_loss(prompt, ids,
    mask, labels, **norm)`, `dtype`, and the forward `__call__(input_ids= | inputs_embeds=,
    attention_mask=, cache=, last_logits_only=, logits_at=) -> dict(logits, hidden_states, cache)`, whose
    positions come from the whole attention mask."""

    config: Any

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def prefixed(self, prompt: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def prefixed_loss(self, prompt: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor, **norm) -> torch.Tensor: ...

    def __call__(self, **inputs) -> dict: ...


DecoderConfig = LLMConfig | OPTConfig
DECODERS: dict[type, type] = {LLMConfig: LLaMA, OPTConfig: OPT}  # config class -> decoder module


def build_decoder(config: DecoderConfig) -> Decoder:
    """A freshly initialised decoder of `config`'s family."""
    if type(config) not in DECODERS:
        raise TypeError(f"{type(config).__name__} is not a decoder config; known: "
                        f"{', '.join(c.__name__ for c in DECODERS)}")
    return DECODERS[type(config)](config)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 30  # generated tokens at most (EOS included)
    min_new_tokens: int = 0  # EOS is forbidden before this many tokens were generated
    num_beams: int = 1  # 1 = greedy / sampling, > 1 = beam search (beam sampling with do_sample)
    length_penalty: float = 1.0  # finished beam score = sum log-prob / new_len ** length_penalty
    early_stopping: Any = False  # HF semantics: False (heuristic), True (stop at num_beams done), "never"
    do_sample: bool = False  # sample instead of taking the argmax / top-k beams
    temperature: float = 1.0  # sampling only: logits / temperature
    top_k: int = 50  # sampling only: keep the k most likely tokens (0 = off; HF default 50)
    top_p: float = 1.0  # sampling only: nucleus mass to keep (1.0 = off)
    repetition_penalty: float = 1.0  # > 1 discourages already seen ids (CTRL / HF rule)
    num_return_sequences: int = 1  # outputs per prompt (<= num_beams for beam search)
    eos_token_id: Any = None  # int, list of ints, or None (OPT captioning: "\n"; Vicuna: 2)
    pad_token_id: int = 0  # fills finished rows and the tail of shorter outputs
    stop_strings: list[str] = field(default_factory=list)  # stop once the decoded new text contains one
    stop_token_sequences: list[list[int]] = field(default_factory=list)  # stop when new ids end with one

    def __post_init__(self):
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError("num_beams and max_new_tokens must be >= 1")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) > "
                             f"num_beams ({self.num_beams})")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [int(e)] if isinstance(e, int) else [int(i) for i in e]


# ----------------------------------------------------------------------------- logits processing

def repetition_penalty(scores: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """scores (N, V); seen_ids (N, S) with ids >= V meaning "nothing" (e.g. masked prompt padding)."""
    V = scores.shape[-1]
    padded = F.pad(scores, (0, 1))  # column V absorbs the "nothing" ids
    ids = seen_ids.clamp(max=V)
    s = padded.gather(1, ids)
    s = torch.where(s < 0, s * penalty, s / penalty)
    return padded.scatter(1, ids, s)[:, :V]


def process_scores(scores: torch.Tensor, *, seen_ids: torch.Tensor, n_new: int, cfg: GenerationConfig,
                   min_keep: int = 1) -> torch.Tensor:
    """Apply HF's processors to next-token scores (N, V): logits (greedy/sample) or log-probs (beams)."""
    if cfg.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seen_ids, cfg.repetition_penalty)
    if n_new < cfg.min_new_tokens and cfg.eos_ids:
        scores = scores.clone()
        scores[:, cfg.eos_ids] = -float("inf")
    if not cfg.do_sample:
        return scores
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k > 0:
        k = min(max(cfg.top_k, min_keep), scores.shape[-1])
        kth = torch.topk(scores, k).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= 1 - cfg.top_p  # the low-probability tail outside the nucleus
        drop[:, -min_keep:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


def hits_stop(new_ids: torch.Tensor, cfg: GenerationConfig, decode: Callable | None) -> torch.Tensor:
    """(N,) bool: does each row of generated ids (N, t) end with EOS / a stop sequence / a stop string?"""
    last = new_ids[:, -1]
    hit = torch.zeros_like(last, dtype=torch.bool)
    for e in cfg.eos_ids:
        hit |= last == e
    for seq in cfg.stop_token_sequences:
        if len(seq) <= new_ids.shape[1]:
            hit |= (new_ids[:, -len(seq):] == torch.tensor(seq, device=new_ids.device)).all(-1)
    if cfg.stop_strings:
        texts = [decode(row) for row in new_ids.tolist()]
        hit |= torch.tensor([any(s in t for s in cfg.stop_strings) for t in texts], device=hit.device)
    return hit


# ----------------------------------------------------------------------------- generation

@dataclass
class _Prompt:
    """A prompt expanded to N = B * copies rows."""
    inputs: dict  # model inputs: input_ids or inputs_embeds
    mask: torch.Tensor  # (N, Tp) 1 = real
    seen_ids: torch.Tensor  # (N, Tp or 0) prompt ids for the repetition penalty, padding set to V


def _expand_prompt(model, input_ids, inputs_embeds, attention_mask, copies: int) -> _Prompt:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    x = input_ids if inputs_embeds is None else inputs_embeds
    B, Tp = x.shape[:2]
    if attention_mask is None:
        attention_mask = torch.ones(B, Tp, dtype=torch.long, device=x.device)
    if attention_mask.shape != (B, Tp):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match the prompt {(B, Tp)}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: the last position of every row must be a real token")
    rep = lambda t: t.repeat_interleave(copies, dim=0)  # noqa: E731  rows of one prompt stay adjacent
    V = model.config.vocab_size
    if input_ids is not None:
        seen = input_ids.masked_fill(attention_mask == 0, V)
        return _Prompt(dict(input_ids=rep(input_ids)), rep(attention_mask), rep(seen))
    empty = torch.zeros(B, 0, dtype=torch.long, device=x.device)
    return _Prompt(dict(inputs_embeds=rep(inputs_embeds)), rep(attention_mask), rep(empty))


@torch.no_grad()
def generate(model: Decoder, *, inputs_embeds: torch.Tensor | None = None,
             input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             config: GenerationConfig, generator: torch.Generator | None = None,
             decode: Callable[[list[int]], str] | None = None) -> dict:
    """Generate continuations of a batch of (left-padded) prompts.

    Args:
        inputs_embeds: (B, Tp, D) prompt vectors (soft prompt + embedded text), or
        input_ids: (B, Tp) prompt ids; exactly one of the two.
        attention_mask: (B, Tp), 1 = real, 0 = left padding.
        generator: RNG for sampling.
        decode: ids -> text, needed for `config.stop_strings`.
    Returns:
        dict(sequences=(B * num_return_sequences, L) new tokens only, rows of one prompt adjacent,
             padded with pad_token_id; scores=(B * num_return_sequences,) beam score (beam search) or
             sum of processed log-probs of the chosen tokens (greedy / sampling)).
    """
    if config.stop_strings and decode is None:
        raise ValueError("stop_strings need a decode callable (ids -> text)")
    if config.num_beams > 1:
        return _beam_search(model, input_ids, inputs_embeds, attention_mask, config, generator, decode)
    return _sample(model, input_ids, inputs_embeds, attention_mask, config, generator, decode)


def _sample(model, input_ids, inputs_embeds, attention_mask, cfg, generator, decode) -> dict:
    copies = cfg.num_return_sequences if cfg.do_sample else 1
    p = _expand_prompt(model, input_ids, inputs_embeds, attention_mask, copies)
    N, Tp = p.mask.shape
    cache = KVCache(model.config.n_layers, capacity=Tp + cfg.max_new_tokens)
    mask = p.mask
    out = model(**p.inputs, attention_mask=mask, cache=cache, last_logits_only=True)
    new = torch.zeros(N, 0, dtype=torch.long, device=mask.device)  # (N, t)
    done = torch.zeros(N, dtype=torch.bool, device=mask.device)
    total = torch.zeros(N, device=mask.device)
    for t in range(cfg.max_new_tokens):
        scores = process_scores(out["logits"][:, -1].float(), seen_ids=torch.cat([p.seen_ids, new], 1),
                                n_new=t, cfg=cfg)
        if cfg.do_sample:
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        total += torch.where(done, 0.0, scores.log_softmax(-1).gather(1, nxt[:, None]).squeeze(1))
        nxt = nxt.masked_fill(done, cfg.pad_token_id)
        new = torch.cat([new, nxt[:, None]], 1)
        done |= hits_stop(new, cfg, decode)
        if bool(done.all()) or t + 1 == cfg.max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(N, 1)], 1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, cache=cache)
    if not cfg.do_sample and cfg.num_return_sequences > 1:  # greedy: identical copies, like HF
        new = new.repeat_interleave(cfg.num_return_sequences, 0)
        total = total.repeat_interleave(cfg.num_return_sequences, 0)
    return dict(sequences=new, scores=total)


def _beam_search(model, input_ids, inputs_embeds, attention_mask, cfg, generator, decode) -> dict:
    K, L = cfg.num_beams, cfg.max_new_tokens
    p = _expand_prompt(model, input_ids, inputs_embeds, attention_mask, K)
    N, Tp = p.mask.shape
    B, dev = N // K, p.mask.device
    n_cand = max(2, 1 + len(cfg.eos_ids)) * K  # enough candidates that K stay open after EOS picks
    top_k_mask = torch.arange(n_cand, device=dev) < K  # only the best K candidates may finish

    run_seqs = torch.full((B, K, L), cfg.pad_token_id, dtype=torch.long, device=dev)  # new tokens
    run_scores = torch.zeros(B, K, device=dev)
    run_scores[:, 1:] = NEG  # all beams start identical: only the first may expand at step 0
    fin_seqs, fin_scores = run_seqs.clone(), torch.full((B, K), NEG, device=dev)
    fin_lens = torch.zeros(B, K, dtype=torch.long, device=dev)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)

    cache = KVCache(model.config.n_layers, capacity=Tp + L)
    mask = p.mask
    out = model(**p.inputs, attention_mask=mask, cache=cache, last_logits_only=True)
    for t in range(L):
        logp = out["logits"][:, -1].float().log_softmax(-1)  # (N, V)
        V = logp.shape[-1]
        seen = torch.cat([p.seen_ids, run_seqs[:, :, :t].reshape(N, t)], 1)
        logp = process_scores(logp, seen_ids=seen, n_new=t, cfg=cfg,
                              min_keep=max(2, len(cfg.eos_ids) + 1))  # HF: keep a non-EOS option
        acc = (logp.view(B, K, V) + run_scores[:, :, None]).view(B, K * V)

        # a. the best (or sampled) 2K continuations over all beams
        if cfg.do_sample:
            idx = torch.multinomial(acc.softmax(-1), n_cand, generator=generator)
            cand_scores = acc.gather(1, idx)
        else:
            cand_scores, idx = torch.topk(acc, n_cand)
        src = idx // V  # (B, n_cand) beam each candidate extends
        cand_seqs = run_seqs.gather(1, src[:, :, None].expand(B, n_cand, L)).clone()
        cand_seqs[:, :, t] = idx % V
        hit = hits_stop(cand_seqs[:, :, :t + 1].reshape(B * n_cand, t + 1), cfg, decode).view(B, n_cand)
        if t + 1 == L:
            hit[:] = True  # max_new_tokens reached: every candidate ends here

        # b. the K best unfinished candidates keep running
        open_scores = cand_scores + hit.float() * NEG
        keep = torch.topk(open_scores, K).indices
        run_seqs = cand_seqs.gather(1, keep[:, :, None].expand(B, K, L))
        run_scores = open_scores.gather(1, keep)
        run_src = src.gather(1, keep)

        # c. finished candidates among the top K compete with earlier hypotheses
        final = cand_scores / ((t + 1) ** cfg.length_penalty)
        final = final + (fin_done.all(-1, keepdim=True) & (cfg.early_stopping is True)).float() * NEG
        final = final + (~improvable).float() * NEG
        final = final + (~(hit & top_k_mask)).float() * NEG
        merged = torch.topk(torch.cat([fin_scores, final], 1), K).indices
        fin_seqs = torch.cat([fin_seqs, cand_seqs], 1).gather(1, merged[:, :, None].expand(B, K, L))
        fin_scores = torch.cat([fin_scores, final], 1).gather(1, merged)
        fin_lens = torch.cat([fin_lens, torch.full_like(hit, t + 1, dtype=torch.long)], 1).gather(1, merged)
        fin_done = torch.cat([fin_done, hit & top_k_mask], 1).gather(1, merged)

        # d. stop when no open beam can beat the worst kept hypothesis (HF heuristic), or all ended
        best_len = L if (cfg.early_stopping == "never" and cfg.length_penalty > 0) else t + 1
        best_possible = run_scores[:, :1] / (best_len ** cfg.length_penalty)
        worst = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, NEG)
        improvable = improvable & (best_possible > worst).any(-1, keepdim=True)
        all_kept = bool(fin_done.all()) and cfg.early_stopping is True
        if not bool(improvable.any()) or all_kept or bool(hit.all()):
            break
        cache.reorder((run_src + torch.arange(B, device=dev)[:, None] * K).view(N))
        mask = torch.cat([mask, mask.new_ones(N, 1)], 1)
        out = model(input_ids=run_seqs[:, :, t].reshape(N, 1), attention_mask=mask, cache=cache)

    R = cfg.num_return_sequences
    seqs, lens = fin_seqs[:, :R].reshape(B * R, L), fin_lens[:, :R].reshape(B * R)
    seqs = seqs[:, :int(lens.max())]
    seqs = seqs.masked_fill(torch.arange(seqs.shape[1], device=dev)[None] >= lens[:, None], cfg.pad_token_id)
    return dict(sequences=seqs, scores=fin_scores[:, :R].reshape(B * R))


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def score_candidates(model: Decoder, *, inputs_embeds: torch.Tensor | None = None,
                     input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     candidates: list[list[int]]) -> torch.Tensor:
    """Sum of log p(candidate tokens | prompt) for every prompt and candidate: (B, C), fp32.

    The prompt runs once; its KV cache is then copied to the C candidates, which run together as one
    right-padded batch (e.g. " yes" / " no" for the AU questions of Exp-VQA Q3).
    """
    if not candidates or any(len(c) == 0 for c in candidates):
        raise ValueError("candidates must be a non-empty list of non-empty id lists")
    p = _expand_prompt(model, input_ids, inputs_embeds, attention_mask, 1)
    B, Tp = p.mask.shape
    C, Lmax, dev = len(candidates), max(len(c) for c in candidates), p.mask.device
    cand = torch.zeros(C, Lmax, dtype=torch.long, device=dev)
    cand_mask = torch.zeros(C, Lmax, dtype=torch.long, device=dev)
    for i, c in enumerate(candidates):
        cand[i, :len(c)] = torch.tensor(c, device=dev)
        cand_mask[i, :len(c)] = 1

    cache = KVCache(model.config.n_layers, capacity=Tp + Lmax)
    first = model(**p.inputs, attention_mask=p.mask, cache=cache, last_logits_only=True)["logits"]
    logp = first[:, -1].float().log_softmax(-1)[:, None, :].expand(B, C, -1)  # predicts token 0
    if Lmax > 1:  # tokens 1.. are predicted from the candidate's own previous tokens
        cache.reorder(torch.arange(B, device=dev).repeat_interleave(C))
        ids = cand[:, :-1].repeat(B, 1)  # (B*C, Lmax-1); right padding is never attended by real tokens
        mask = torch.cat([p.mask.repeat_interleave(C, 0), cand_mask[:, :-1].repeat(B, 1)], 1)
        rest = model(input_ids=ids, attention_mask=mask, cache=cache)["logits"].float().log_softmax(-1)
        logp = torch.cat([logp[:, :, None], rest.view(B, C, Lmax - 1, -1)], 2)  # (B, C, Lmax, V)
    else:
        logp = logp[:, :, None]
    tok = logp.gather(-1, cand[None, :, :, None].expand(B, C, Lmax, 1)).squeeze(-1)  # (B, C, Lmax)
    return (tok * cand_mask[None]).sum(-1)
