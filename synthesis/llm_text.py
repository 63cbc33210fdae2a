"""LLM caption synthesis through any OpenAI-compatible endpoint: cache, retries, spend.

The prompts (Exp-BLIP's, verbatim, and our regional one) and the reply checks are in
synthesis/prompts.py; which prompts a dataset record asks, and where the replies go, in
synthesis/llm_captions.py.

Operational policy (ours): one cache file per (model, prompt, params) sha256, written
atomically, so reruns are free and an interrupted run resumes with nothing lost or duplicated;
identical prompts in a batch are sent once; bounded thread concurrency; the `openai` client's own
retries are disabled (max_retries=0) so ours is the policy in effect: exponential backoff with
full jitter, at least the server's Retry-After, on 429 / 5xx / timeouts / connection errors /
unparseable bodies, and on 200 replies that are not a chat completion (a proxy's HTML page, a bare
JSON string, no `choices`, a null message): those are endpoint failures, not answers, and are never
cached. Replies that mention an AU, name an emotion when told not to, are empty or too long are
rejected and asked again, then replaced by the rule-based text (that verdict is cached: the model
was asked `max_rejects` times). Both kinds of fallback are counted in `LLMStats`; a prompt that got
no valid reply at all is `failed`, is not cached and is asked again by the next run, and a batch
stops asking once its fallbacks exceed `max_fallbacks` (the caller's share of them, see
llm_captions.py). A token budget stops new calls once reached (in-flight calls may overshoot it by
at most `concurrency` replies). The API key comes from the constructor or the environment, and is
never logged, hashed, cached or written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from expvl.synthesis.prompts import check_reply
from expvl.vocab.shards import atomic_write

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- config + results

@dataclass
class LLMConfig:
    enabled: bool = False  # off: rule-based text only (no endpoint needed)
    base_url: str = ""  # "" -> $OPENAI_BASE_URL -> the openai default
    model: str = "gpt-3.5-turbo"  # Exp-BLIP used GPT-3.5
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the variable holding the key (never the key)
    temperature: float = 0.7  # not published; part of the cache key
    max_tokens: int = 256  # reply cap sent to the server; part of the cache key
    samples_per_prompt: int = 1  # distinct cached replies per prompt (records pick one by id)
    timeout_s: float = 30.0  # per HTTP call
    max_attempts: int = 6  # HTTP attempts per prompt on transient errors
    max_rejects: int = 3  # malformed replies tolerated per prompt before the rule-based fallback
    backoff_base_s: float = 1.0  # first retry waits up to this; doubles per attempt (full jitter)
    backoff_max_s: float = 60.0  # cap of one wait
    concurrency: int = 4  # threads issuing calls
    max_total_tokens: int = 0  # spend limit: usage tokens of fresh calls per client (one CLI run); 0 = none
    max_reply_words: int = 150  # longer replies are rejected
    max_fallback_share: float = 0.0  # share of requests allowed to end with the rule-based text
    #   (rejected replies, or no valid reply: endpoint down, errors until max_attempts, non-completion
    #   bodies); more is an error and nothing is written. 0.0: any fallback fails the run
    cache_dir: str = ""  # "" -> <out_dir>/llm_cache
    regions: bool = True  # also ask for Q2 regional descriptions of regions with active AUs
    fuse: bool = True  # zero-shot fusion (Fig. 4) for records with AU labels and an emotion

    def hashed_fields(self) -> dict:
        """The fields that change the text (the config hash); operational knobs are left out."""
        return {"enabled": self.enabled, "model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "samples_per_prompt": self.samples_per_prompt,
                "max_reply_words": self.max_reply_words, "max_rejects": self.max_rejects,
                "regions": self.regions, "fuse": self.fuse}


class LLMError(RuntimeError):
    """A configuration problem the endpoint reported (bad key, unknown model, missing key)."""


class LLMFallbackError(LLMError):
    """More requests fell back to the rule-based text than `max_fallback_share` allows; `stats` says how."""

    def __init__(self, message: str, stats: LLMStats):
        super().__init__(message)
        self.stats = stats


@dataclass
class LLMRequest:
    id: str  # caller's id, e.g. "synthfacs/train/000001:au_llm"
    prompt: str
    fallback: str  # rule-based text used when the reply is rejected or never obtained
    forbid_emotion: bool = True
    variant: int = 0  # which of `samples_per_prompt` cached replies


@dataclass
class LLMResult:
    text: str
    source: str  # "cache" | "llm" | "fallback" (replies rejected, cached) | "failed" (no valid reply,
    #   not cached) | "skipped" (not asked: spend limit, call budget, too many fallbacks)
    reason: str | None = None  # why a fallback / failure / skip happened

    @property
    def fell_back(self) -> bool:
        return self.source in ("fallback", "failed")


@dataclass
class LLMStats:
    requests: int = 0
    unique_prompts: int = 0
    cache_hits: int = 0
    http_calls: int = 0
    retries: int = 0
    rejected_replies: int = 0
    fallbacks: int = 0  # requests answered by the rule-based text: rejected replies + `failed`
    failed: int = 0  # of those, requests that got no valid reply (not cached: the next run asks again)
    skipped: int = 0  # requests not attempted: spend limit, call budget or fallback bound reached
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spend_limit_reached: bool = False
    errors: dict[str, int] = field(default_factory=dict)  # transient error kind -> count
    fallback_reasons: dict[str, int] = field(default_factory=dict)  # why requests fell back -> count

    @property
    def complete(self) -> bool:
        """Every request has its final answer: none skipped, none waiting for an endpoint that failed."""
        return self.skipped == 0 and self.failed == 0


@dataclass
class LLMBatch:
    results: dict[str, LLMResult]  # request id -> result, every request exactly once
    stats: LLMStats


# ---------------------------------------------------------------------------- cache

class ResponseCache:
    """One JSON file per (model, prompt, params) key: <dir>/<key[:2]>/<key>.json."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(model: str, prompt: str, params: dict) -> str:
        blob = json.dumps({"model": model, "prompt": prompt, "params": params}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:  # cannot happen with atomic writes; recompute if it does
            log.warning("ignoring unreadable cache entry %s", p)
            return None

    def put(self, key: str, entry: dict) -> None:
        atomic_write(self.path(key), (json.dumps(entry, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------- client

class LLMTextClient:
    """Runs batches of prompts against an OpenAI-compatible endpoint under the policy above.

    Args:
        cfg: LLMConfig.
        cache_dir: where replies are cached (created on demand).
        api_key: the key; when None it is read from the environment variable `cfg.api_key_env`.
    """

    def __init__(self, cfg: LLMConfig, cache_dir: str | Path, *, api_key: str | None = None):
        self.cfg = cfg
        self.cache = ResponseCache(cache_dir)
        self._api_key = api_key if api_key is not None else os.environ.get(cfg.api_key_env)
        self._client = None
        self._lock = threading.Lock()
        self.tokens_spent = 0  # usage tokens of fresh calls over this client's life (spend limit)

    def check_key(self) -> None:
        """Fail before any work when no key is available."""
        if not self._api_key:
            raise LLMError(f"no API key: set ${self.cfg.api_key_env} (any value for local servers)")

    def _openai(self):
        with self._lock:  # worker threads share one client (and its connection pool)
            if self._client is None:
                import openai  # imported lazily: the rule-only pipeline never needs it

                self.check_key()
                base_url = self.cfg.base_url or os.environ.get("OPENAI_BASE_URL") or None
                self._client = openai.OpenAI(api_key=self._api_key, base_url=base_url,
                                             timeout=self.cfg.timeout_s, max_retries=0)
            return self._client

    def params(self, variant: int) -> dict:
        return {"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens,
                "variant": variant}

    def run(self, requests: list[LLMRequest], *, max_calls: int | None = None,
            max_fallbacks: int | None = None) -> LLMBatch:
        """Answer every request (cache, endpoint, or fallback). `max_calls` bounds fresh HTTP calls;
        once more than `max_fallbacks` requests have fallen back, the rest are skipped, not asked
        (an endpoint that is down fails after a few prompts' retries instead of after all of them)."""
        stats = LLMStats(requests=len(requests))
        groups: dict[str, list[LLMRequest]] = {}
        for r in requests:
            key = self.cache.key(self.cfg.model, r.prompt, self.params(r.variant))
            groups.setdefault(key, []).append(r)
        stats.unique_prompts = len(groups)
        # shared by the worker threads, guarded by self._lock
        budget = {"calls_left": max_calls, "fallbacks_left": max_fallbacks}
        errors: Counter = Counter()

        def answer(key: str) -> LLMResult:
            first = groups[key][0]
            hit = self.cache.get(key)
            # a rejection is trusted only with the reply it rejected: entries without one were written
            # for bodies that were no completion at all, before those were told apart from answers
            if hit is not None and (hit["accepted"] or isinstance(hit.get("text"), str)):
                with self._lock:
                    stats.cache_hits += 1
                res = (LLMResult(hit["text"], "cache") if hit["accepted"]
                       else LLMResult(first.fallback, "fallback", hit["reason"]))
            else:
                res = self._ask(key, first, stats, budget, errors)
            if res.fell_back and budget["fallbacks_left"] is not None:
                with self._lock:
                    budget["fallbacks_left"] -= len(groups[key])
            return res

        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            by_key = dict(zip(groups, pool.map(answer, list(groups))))
        results: dict[str, LLMResult] = {}
        reasons: Counter = Counter()
        for key, reqs in groups.items():
            res = by_key[key]
            for r in reqs:  # a shared prompt's fallback is each request's own rule text
                results[r.id] = res if res.source in ("cache", "llm") else LLMResult(r.fallback, res.source, res.reason)
                stats.fallbacks += res.fell_back
                stats.failed += res.source == "failed"
                stats.skipped += res.source == "skipped"
                reasons[res.reason] += res.fell_back
        stats.errors = dict(errors)
        stats.fallback_reasons = {k: n for k, n in reasons.items() if n}
        log.log(logging.WARNING if stats.fallbacks else logging.INFO,
                "LLM: %d requests, %d unique prompts, %d cache hits, %d calls, %d retries, %d rejected, "
                "%d fallbacks (%d failed), %d skipped, %d tokens%s", stats.requests, stats.unique_prompts,
                stats.cache_hits, stats.http_calls, stats.retries, stats.rejected_replies, stats.fallbacks,
                stats.failed, stats.skipped, stats.prompt_tokens + stats.completion_tokens,
                " (spend limit reached)" if stats.spend_limit_reached else "")
        return LLMBatch(results, stats)

    def _may_call(self, stats: LLMStats, budget: dict) -> str | None:
        """Reserve one HTTP call, or say why not (spend limit / call budget)."""
        with self._lock:
            limit = self.cfg.max_total_tokens
            if limit and self.tokens_spent >= limit:
                stats.spend_limit_reached = True
                return "spend limit reached"
            if budget["fallbacks_left"] is not None and budget["fallbacks_left"] < 0:
                return "not asked: too many fallbacks already"
            if budget["calls_left"] is not None:
                if budget["calls_left"] <= 0:
                    return "call budget reached"
                budget["calls_left"] -= 1
            stats.http_calls += 1
            return None

    def _ask(self, key: str, req: LLMRequest, stats: LLMStats, budget: dict, errors: Counter) -> LLMResult:
        import openai

        transient = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError,
                     openai.APIResponseValidationError, json.JSONDecodeError)
        rejects = attempts = 0
        while True:
            why_not = self._may_call(stats, budget)
            if why_not:
                return LLMResult(req.fallback, "skipped", why_not)
            attempts += 1
            retry_after = None
            try:
                resp = self._openai().chat.completions.create(
                    model=self.cfg.model, messages=[{"role": "user", "content": req.prompt}],
                    temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens)
            except transient as e:
                kind = type(e).__name__
                if isinstance(e, openai.APIStatusError):
                    kind = f"{kind}({e.status_code})"
                    retry_after = _retry_after(e)
            except openai.APIStatusError as e:  # 4xx other than 429: a config problem, stop loudly
                if e.status_code < 500:
                    raise LLMError(f"endpoint refused the request: HTTP {e.status_code} "
                                   f"({type(e).__name__}); check model / base_url / key") from None
                kind = f"{type(e).__name__}({e.status_code})"
            else:
                self._count_usage(resp, stats)
                text, invalid = reply_text(resp)
                if invalid is None:
                    reason = check_reply(text, forbid_emotion=req.forbid_emotion,
                                         max_words=self.cfg.max_reply_words)
                    if reason is None:
                        self.cache.put(key, self._entry(key, req, text.strip(), True, None))
                        return LLMResult(text.strip(), "llm")
                    rejects += 1
                    with self._lock:
                        stats.rejected_replies += 1
                    if rejects >= self.cfg.max_rejects:  # cached, so a rerun does not pay again
                        self.cache.put(key, self._entry(key, req, text or "", False, reason))
                        return LLMResult(req.fallback, "fallback", reason)
                    continue
                kind = f"invalid reply ({invalid})"  # not an answer: retried like an error, never cached
            with self._lock:
                errors[kind] += 1
            if attempts >= self.cfg.max_attempts:
                return LLMResult(req.fallback, "failed", f"no valid reply in {attempts} attempts (last: {kind})")
            with self._lock:
                stats.retries += 1
            time.sleep(self._backoff(attempts, retry_after))

    def _count_usage(self, resp, stats: LLMStats) -> None:
        usage = getattr(resp, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
        completion_tokens = getattr(usage, "completion_tokens", 0) or 0
        with self._lock:
            stats.prompt_tokens += prompt_tokens
            stats.completion_tokens += completion_tokens
            self.tokens_spent += prompt_tokens + completion_tokens

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1))
        wait = random.uniform(0, cap)  # full jitter
        return max(wait, min(retry_after, self.cfg.backoff_max_s)) if retry_after else wait

    def _entry(self, key: str, req: LLMRequest, text: str | None, accepted: bool, reason) -> dict:
        return {"key": key, "model": self.cfg.model, "params": self.params(req.variant),
                "prompt": req.prompt, "text": text, "accepted": accepted, "reason": reason}


def _retry_after(e) -> float | None:
    try:
        return float(e.response.headers.get("retry-after"))
    except (TypeError, ValueError, AttributeError):
        return None


def reply_text(resp) -> tuple[str | None, str | None]:
    """(the reply's text, None), or (None, what is wrong) when `resp` is no chat completion.

    The openai client hands back whatever a 200 carried: the plain string of an HTML page or of a
    bare JSON string, an object without `choices`, a choice whose message is null. None of these is
    the model's answer, so none may be judged (or cached) as one. A null or empty `content` is an
    answer, an empty one, which the reply checks reject.
    """
    if not hasattr(resp, "choices"):
        return None, f"{type(resp).__name__} body, not a chat completion"
    choices = resp.choices
    if not isinstance(choices, list) or not choices:
        return None, "no choices"
    message = getattr(choices[0], "message", None)
    if message is None:
        return None, "message is null"
    content = getattr(message, "content", None)
    if content is not None and not isinstance(content, str):
        return None, f"content is a {type(content).__name__}"
    return content, None
