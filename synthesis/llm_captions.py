"""LLM captions for dataset records: which prompts a record asks (Exp-BLIP's AU description, our regional
ones, then the zero-shot AU + emotion fusion built on the AU reply), sent through
synthesis/llm_text.py's `LLMTextClient` (cache, retries, spend), written back into the records.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from expvl.synthesis.llm_text import LLMRequest, LLMStats, LLMTextClient
from expvl.synthesis.prompts import au_prompt, fusion_prompt, region_prompt
from expvl.vocab.facs import AUS, sort_aus


def add_llm_captions(records, client: LLMTextClient, *, max_calls: int | None = None) -> LLMStats:
    """Add "au_llm" and replace "fused" / "region:<r>" captions of `records` (in place) by LLM text.

    Records must already hold their rule-based captions (text_rules.rule_captions): they are the
    fallbacks. As in Exp-BLIP, a face with no active AU gets the fixed description instead of a
    call, and the fusion uses the LLM AU caption (phase 2 waits for phase 1).
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
    first = client.run(phase1, max_calls=max_calls)
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
        second = client.run(phase2, max_calls=left)
        for req_id, res in second.results.items():
            by_id[req_id.rsplit("|", 1)[0]].captions["fused"] = res.text
        stats = _merge(stats, second.stats)
    return stats


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
