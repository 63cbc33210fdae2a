"""LLM fallbacks are never silent: bodies that are not chat completions are retried and never cached, an
endpoint that is down or keeps failing stops the run with counts, the allowed share of rule-based text is
a setting, and whatever got no valid reply is asked again by the next run. A real HTTP server on
127.0.0.1 speaks the OpenAI API (tests/helpers/fake_openai_server.py)."""

import json
import os
import re
import subprocess
import sys

import pytest

from expvl.synthesis.build import main
from expvl.synthesis.llm_captions import add_llm_captions
from expvl.synthesis.llm_text import LLMConfig, LLMFallbackError, LLMRequest, LLMTextClient
from expvl.vocab.facs import AUS
from expvl.vocab.records import Record
from expvl.vocab.shards import iter_shard_records, read_manifest
from tests.helpers.fake_openai_server import INVALID_BODIES, FakeOpenAIServer, reply_for, unused_base_url

KEY = "sk-test-fallbacks"
TINY = ["synthfacs.n_train=6", "synthfacs.n_val=2", "synthfacs.n_test=2", "synthfacs.size=64",
        "synthfacs.workers=1", "synthfacs.n_identities_train=3", "synthfacs.n_identities_test=2", "shard_size=5"]


def cfg_for(base_url, **kw):
    base = {"enabled": True, "base_url": base_url, "model": "fake-model", "timeout_s": 2.0, "max_attempts": 3,
            "backoff_base_s": 0.01, "backoff_max_s": 0.02, "concurrency": 1, "max_rejects": 2}
    return LLMConfig(**{**base, **kw})


def requests(n):
    return [LLMRequest(f"r{i}", f"prompt {i}", fallback=f"rule text {i}") for i in range(n)]


def records(n):
    """Records holding their rule-based captions, each with another active AU: one distinct AU prompt each
    (no region caption, no emotion: no other request)."""
    return [Record(f"t/train/{i}", f"{i}.png", "t", "train", aus={au: 1}, captions={"au_rule": f"rule {i}"})
            for i, au in zip(range(n), AUS, strict=False)]


def cache_files(path):
    return sorted(path.rglob("*.json"))


@pytest.mark.parametrize("body", sorted(INVALID_BODIES))
def test_a_200_that_is_no_completion_is_retried_and_never_cached(tmp_path, body):
    with FakeOpenAIServer() as server:
        server.faults.append(body)
        batch = LLMTextClient(cfg_for(server.base_url), tmp_path, api_key=KEY).run(requests(1))
    res = batch.results["r0"]
    assert res.source == "llm" and res.text == reply_for("prompt 0")
    assert batch.stats.retries == 1 and batch.stats.rejected_replies == 0 and batch.stats.fallbacks == 0
    [kind] = batch.stats.errors
    assert kind.startswith("invalid reply (")
    [entry] = cache_files(tmp_path)  # only the good reply
    assert json.loads(entry.read_text())["accepted"] is True


def test_replies_that_never_become_valid_fail_uncached_and_are_asked_again(tmp_path):
    with FakeOpenAIServer() as server:
        server.always_fault = "message_null"
        client = LLMTextClient(cfg_for(server.base_url), tmp_path, api_key=KEY)
        batch = client.run(requests(3))
        assert server.requests == 3 * 3  # max_attempts per prompt, no more
        for i in range(3):
            assert batch.results[f"r{i}"].source == "failed" and batch.results[f"r{i}"].text == f"rule text {i}"
        s = batch.stats
        assert (s.fallbacks, s.failed, s.skipped, s.complete) == (3, 3, 0, False)
        assert s.fallback_reasons == {"no valid reply in 3 attempts (last: invalid reply (message is null))": 3}
        assert cache_files(tmp_path) == []
        server.always_fault = None  # the endpoint recovers: the same prompts are asked again
        again = client.run(requests(3))
    assert again.stats.complete and again.stats.fallbacks == 0 and again.stats.http_calls == 3
    assert {k: r.text for k, r in again.results.items()} == {f"r{i}": reply_for(f"prompt {i}") for i in range(3)}


def test_an_old_cache_entry_without_the_rejected_reply_is_asked_again(tmp_path):
    """Caches written before invalid bodies were told apart hold {"accepted": false, "text": null}."""
    with FakeOpenAIServer() as server:
        client = LLMTextClient(cfg_for(server.base_url), tmp_path, api_key=KEY)
        key = client.cache.key("fake-model", "prompt 0", client.params(0))
        client.cache.put(key, {"key": key, "text": None, "accepted": False, "reason": "empty"})
        batch = client.run(requests(1))
        assert server.requests == 1
    assert batch.results["r0"].source == "llm" and batch.stats.cache_hits == 0


def test_endpoint_down_stops_after_the_first_failure(tmp_path):
    client = LLMTextClient(cfg_for(unused_base_url()), tmp_path, api_key=KEY)
    recs = records(5)
    with pytest.raises(LLMFallbackError, match=r"1 of 5 requests fell back .*max_fallback_share=0.0 allows 0\): "
                                               r"1 x no valid reply in 3 attempts \(last: APIConnectionError\); "
                                               r"4 more not asked") as e:
        add_llm_captions(recs, client)
    s = e.value.stats
    assert (s.http_calls, s.fallbacks, s.failed, s.skipped) == (3, 1, 1, 4)
    assert s.errors == {"APIConnectionError": 3} and cache_files(tmp_path) == []


def test_500_until_attempts_run_out_is_bounded_by_the_share(tmp_path):
    with FakeOpenAIServer() as server:
        server.always_fault = "500"
        server.faults.extend([None] * 3)  # the first three prompts are answered
        client = LLMTextClient(cfg_for(server.base_url, max_fallback_share=0.25), tmp_path, api_key=KEY)
        with pytest.raises(LLMFallbackError, match=r"3 of 8 requests .*allows 2\).*InternalServerError\(500\)") as e:
            add_llm_captions(records(8), client)
        # three good replies; prompts 3, 4 and 5 use their 3 attempts each, the third failure crosses the
        # bound (2 of 8) and the last two prompts are not asked
        assert server.requests == 3 + 3 * 3
    s = e.value.stats
    assert (s.fallbacks, s.failed, s.skipped) == (3, 3, 2)


def test_within_the_share_the_run_goes_on_and_says_so(tmp_path, caplog):
    recs = records(4)
    with FakeOpenAIServer() as server:
        server.always_malformed.add("contains AU1 in")  # the first record's prompt is always rejected
        client = LLMTextClient(cfg_for(server.base_url, max_fallback_share=0.25), tmp_path, api_key=KEY)
        s = add_llm_captions(recs, client)
    assert (s.fallbacks, s.failed, s.rejected_replies, s.complete) == (1, 0, 2, True)  # a rejection is final
    assert [r.captions["au_llm"].startswith("Synthetic reply") for r in recs] == [False, True, True, True]
    assert recs[0].captions["au_llm"] == "rule 0"
    assert "1 fallbacks (0 failed)" in caplog.text and "WARNING" in caplog.text


def test_cli_fails_on_an_endpoint_down_then_a_rerun_asks_again(tmp_path, monkeypatch):
    """The case of the report: `python -m expvl.synthesis text.llm.enabled=true` with nothing listening used
    to exit 0, "complete": true, every LLM caption the rule text and nothing retried on the next run."""
    out = tmp_path / "ds"
    down = [f"out_dir={out}", *TINY, "text.llm.enabled=true", f"text.llm.base_url={unused_base_url()}",
            "text.llm.backoff_base_s=0.01", "text.llm.max_attempts=2", "text.llm.concurrency=1"]
    proc = subprocess.run([sys.executable, "-m", "expvl.synthesis", *down], capture_output=True, text=True,
                          env={**os.environ, "OPENAI_API_KEY": KEY}, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"error: LLM captions: \d+ of \d+ requests fell back .*APIConnectionError", proc.stderr)
    assert read_manifest(out) is None and read_manifest(out / "stages" / "text") is None  # nothing claims done
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAIServer() as server:
        up = [f"out_dir={out}", *TINY, "text.llm.enabled=true", f"text.llm.base_url={server.base_url}",
              "text.llm.backoff_base_s=0.01"]
        server.always_fault = "html"  # a proxy answering 200 with its error page, allowed by the share
        tolerated = main([*up, "text.llm.max_fallback_share=1.0", "text.llm.max_attempts=2"])
        assert tolerated["complete"] is False and tolerated["llm"]["failed"] == tolerated["llm"]["requests"] > 0
        assert read_manifest(out)["complete"] is False
        server.always_fault = None
        done = main(up)  # the incomplete text stage is redone: every prompt asked again, none fell back
    assert done["complete"] and done["llm"]["fallbacks"] == 0 and done["llm"]["cache_hits"] == 0
    assert read_manifest(out)["complete"] is True
    for r in iter_shard_records(out):
        if r.positive_aus:
            assert r.captions["au_llm"].startswith("Synthetic reply")


def test_the_share_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"text.llm.max_fallback_share .* in \[0, 1\]; got 1.5"):
        main([f"out_dir={tmp_path}", *TINY, "text.llm.max_fallback_share=1.5"])
