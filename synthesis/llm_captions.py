"""LLM captions for dataset records: which prompts a record asks (Exp-BLIP's AU description, our regional
ones, then the zero-shot AU + emotion fusion built on the AU reply), sent through
synthesis/llm_text.py's `LLMTextClient` (cache, retries, spend), written back into the records.

Fallbacks are bounded: a dataset whose "LLM" captions are quietly the rule-based ones would train
and evaluate as if the LLM had written them. Once more than `max_fallback_share` of the requests
fell back (rejected replies, or no valid reply from the endpoint), no further prompt is sent and
`LLMFallbackError` says how many fell back and why.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from expvl.synthesis.llm_text import LLMFallbackError, LLMRequest, LLMStats, LLMTextClient
from expvl.synthesis.prompts import au_prompt, fusion_prompt, region_prompt
from expvl.vocab.facs import AUS, sort_aus


def add_llm_captions(records, client: LLMTextClient, *, max_calls: int | None = None) -> LLMStats:
    """Add "au_llm" and replace "fused" / "region:<r>" captions of `records` (in place) by LLM text.

    Records must already hold their rule-based captions (text_rules.rule_captions): they are the
    fallbacks. As in Exp-BLIP, a face with no active AU gets the fixed description instead of a
    call, and the fusion uses the LLM AU caption (phase 2 waits for phase 1). Raises
    `LLMFallbackError` when more than `cfg.max_fallback_share` of the requests fell back.
    """
    cfg = client.cfg
    by_id = {r.id: r for r in records}
    phase1: list[LLMRequest] = []
    for r in records:
        variant = _variant(r.id, cfg.samples_per_prompt)
        active = sort_aus(au for au, v in r.aus.items() if v)
        if active:
            phase1.append(LLMRequest(f"{r.id}|au_llm", au_prompt(active), r.captions["au_rule"],
                                     variant=variant))
        elif r.aus:
            r.captions["au_llm"] = r.captions["au_rule"]  # the fixed no-AU description
        if cfg.regions:
            for kind in [k for k in r.captions if k.startswith("region:")]:
                region = kind.split(":", 1)[1]
                region_active = [au for au in active if AUS[au].region == region]
                if region_active:
                    phase1.append(LLMRequest(f"{r.id}|{kind}", region_prompt(region, region_active),
                                             r.captions[kind], variant=variant))
    # the fusion requests are known before phase 1 answers: one per record with an emotion and an AU caption
    fused = sum(r.emotion is not None and bool(r.aus or "au_llm" in r.captions) for r in records) if cfg.fuse else 0
    allowed = allowed_fallbacks(cfg.max_fallback_share, len(phase1) + fused)
    first = client.run(phase1, max_calls=max_calls, max_fallbacks=allowed)
    for req_id, res in first.results.items():
        rid, kind = req_id.rsplit("|", 1)
        by_id[rid].captions[kind] = res.text
    stats = first.stats
    if cfg.fuse:
        phase2 = [LLMRequest(f"{r.id}|fused", fusion_prompt(r.captions["au_llm"], r.captions["emotion"]),
                             r.captions["fused"], forbid_emotion=False,
                             variant=_variant(r.id, cfg.samples_per_prompt))
                  for r in records if r.emotion is not None and "au_llm" in r.captions]
        left = None if max_calls is None else max(0, max_calls - stats.http_calls)
        second = client.run(phase2, max_calls=left, max_fallbacks=allowed - first.stats.fallbacks)
        for req_id, res in second.results.items():
            by_id[req_id.rsplit("|", 1)[0]].captions["fused"] = res.text
        stats = _merge(stats, second.stats)
    if stats.fallbacks > allowed:
        raise LLMFallbackError(fallback_message(stats, cfg.max_fallback_share), stats)
    return stats


def allowed_fallbacks(share: float, requests: int) -> int:
    """How many of `requests` may fall back under `share` (the 1e-9 keeps 0.29 * 100 at 29)."""
    return int(share * requests + 1e-9)


def fallback_message(stats: LLMStats, share: float) -> str:
    """One line: how many requests fell back, the main reasons, and what a rerun will do."""
    reasons = "; ".join(f"{n} x {why}" for why, n in Counter(stats.fallback_reasons).most_common(3))
    return (f"LLM captions: {stats.fallbacks} of {stats.requests} requests fell back to the rule-based text "
            f"(text.llm.max_fallback_share={share} allows {allowed_fallbacks(share, stats.requests)}): {reasons}"
            f"{f'; {stats.skipped} more not asked' if stats.skipped else ''}. The {stats.failed} without a "
            "valid reply were not cached and are asked again by a rerun; raise text.llm.max_fallback_share "
            "to accept rule-based text")


def _variant(record_id: str, n: int) -> int:
    return int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16) % max(1, n)


def _merge(a: LLMStats, b: LLMStats) -> LLMStats:
    out = LLMStats()
    for name in LLMStats.__dataclass_fields__:
        va, vb = getattr(a, name), getattr(b, name)
        if isinstance(va, bool):
            setattr(out, name, va or vb)
        elif isinstance(va, dict):
            setattr(out, name, dict(Counter(va) + Counter(vb)))
        else:
            setattr(out, name, va + vb)
    return out
