"""LLM client against a real local HTTP server: faults, cache, spend limit, resume, key hygiene."""

import json
import logging
import random

import pytest

from expvl.synthesis import text_rules
from expvl.synthesis.llm_captions import add_llm_captions
from expvl.synthesis.llm_text import LLMConfig, LLMRequest, LLMTextClient
from expvl.synthesis.prompts import au_prompt, check_reply, fusion_prompt, region_prompt
from expvl.synthesis.vqa import record_rng
from expvl.vocab.facs import SYNTHFACS_AUS
from expvl.vocab.records import Record
from tests.helpers.fake_openai_server import FakeOpenAIServer, reply_for

KEY = "sk-test-DO-NOT-LEAK-1234567890"


def cfg_for(server, **kw):
    base = {"enabled": True, "base_url": server.base_url, "model": "fake-model", "timeout_s": 0.5, "max_attempts": 8,
                "backoff_base_s": 0.01, "backoff_max_s": 0.05, "concurrency": 4, "max_rejects": 3}
    return LLMConfig(**{**base, **kw})


def requests(n, tag="p"):
    return [LLMRequest(f"r{i}", f"prompt {tag} {i}", fallback=f"rule text {i}") for i in range(n)]


def cache_files(path):
    return sorted(p for p in path.rglob("*.json"))


def test_prompts_are_the_papers():
    p = au_prompt(["AU24", "AU10", "AU17", "AU14"])
    lines = p.split("\n")
    assert lines[:27] == [f"{n}: {a.noun}" for n, a in __import__("expvl.vocab.facs", fromlist=["AUS"]).AUS.items()]
    assert lines[27] == ("You are currently acting as an AU description expert, and you should answer questions "
                         "according to this example:")
    assert lines[28] == ('Question: "Describe briefly the facial actions or status of a face which contains AU2, '
                         'AU4, AU9, AU20, AU25 in 1-9 sentences. Do not describe the emotion or facial expressions, '
                         'and do not mention \'AU\' in the reply."')
    assert lines[29].startswith('Answer: "The face shows the outer eyebrows raised, forehead wrinkles')
    assert lines[30] == ("Question: Describe briefly the facial actions or status of a face which contains AU10, "
                         "AU14, AU17, AU24 in 1-9 sentences. Do not describe the emotion or facial expressions, "
                         "and do not mention 'AU' in the reply.")
    assert lines[31] == "Answer:"
    f = fusion_prompt("A.", "The face shows anger.")
    assert f.startswith("Combine the facial action sentence with the emotion sentence. This combined sentence "
                        "should describe all the facial actions and emotions mentioned in these two sentences by "
                        "pointing out how each emotion is inferred from the corresponding facial actions.\n")
    assert f.endswith('Facial Action Sentence: "A."\nEmotion Sentence: "The face shows anger."')
    assert "mouth" in region_prompt("mouth", ["AU12"]) and "AU12" in region_prompt("mouth", ["AU12"])


def test_check_reply():
    assert check_reply("The brows rise.", forbid_emotion=True, max_words=10) is None
    assert check_reply("", forbid_emotion=True, max_words=10) == "empty"
    assert check_reply("AU12 is on.", forbid_emotion=True, max_words=10) == "mentions AU"
    assert check_reply("The person looks happy.", forbid_emotion=True, max_words=10) == "names an emotion"
    assert check_reply("The person looks happy.", forbid_emotion=False, max_words=10) is None
    assert check_reply("word " * 11, forbid_emotion=False, max_words=10) == "too long"


def test_faults_are_retried_and_every_request_answered_once(tmp_path):
    with FakeOpenAIServer(hang_s=1.0) as server:
        server.faults.extend(["429", "500", "hang", "garbage", "kill", "malformed", "500", "429"])
        client = LLMTextClient(cfg_for(server), tmp_path / "cache", api_key=KEY)
        reqs = requests(12)
        reqs.append(LLMRequest("dup", "prompt p 3", fallback="x"))  # same prompt as r3: one call
        batch = client.run(reqs)
        assert set(batch.results) == {r.id for r in reqs}
        for r in reqs:
            assert batch.results[r.id].text == reply_for(r.prompt)
            assert batch.results[r.id].source == "llm"
        s = batch.stats
        assert s.unique_prompts == 12 and s.fallbacks == 0 and s.skipped == 0
        assert s.rejected_replies == 1 and s.retries == 7 and s.http_calls == server.requests == 12 + 8
        assert sum(s.errors.values()) == 7
        assert {"APITimeoutError", "APIConnectionError", "JSONDecodeError", "RateLimitError(429)",
                "InternalServerError(500)"} == set(s.errors)
        assert all(n == 1 for n in server.served.values())  # every good reply served exactly once
        assert len(cache_files(tmp_path / "cache")) == 12
        # rerun: all from the cache, zero HTTP requests
        before = server.requests
        again = LLMTextClient(cfg_for(server), tmp_path / "cache", api_key=KEY).run(reqs)
        assert server.requests == before and again.stats.cache_hits == 12 and again.stats.http_calls == 0
        assert {k: v.text for k, v in again.results.items()} == {k: v.text for k, v in batch.results.items()}


def test_malformed_replies_fall_back_and_are_counted(tmp_path):
    with FakeOpenAIServer() as server:
        server.always_malformed.add("BAD")
        client = LLMTextClient(cfg_for(server, max_rejects=2), tmp_path, api_key=KEY)
        reqs = requests(3) + [LLMRequest("bad", "prompt BAD", fallback="the rule-based text")]
        batch = client.run(reqs)
        assert batch.results["bad"].text == "the rule-based text"
        assert batch.results["bad"].source == "fallback" and batch.results["bad"].reason == "mentions AU"
        assert batch.stats.rejected_replies == 2 and batch.stats.fallbacks == 1
        n = server.requests
        again = client.run(reqs)  # the rejection is cached too: a rerun is free
        assert server.requests == n and again.results["bad"].text == "the rule-based text"


def test_spend_limit_stops_new_calls(tmp_path):
    with FakeOpenAIServer() as server:
        per_call = len(["prompt", "p", "0"]) + len(reply_for("prompt p 0").split())
        client = LLMTextClient(cfg_for(server, concurrency=1, max_total_tokens=3 * per_call), tmp_path,
                               api_key=KEY)
        batch = client.run(requests(10))
        assert server.requests == 3
        assert batch.stats.spend_limit_reached and batch.stats.skipped == 7 and not batch.stats.complete
        skipped = [r for r in batch.results.values() if r.source == "skipped"]
        assert len(skipped) == 7 and all(r.text.startswith("rule text") for r in skipped)


def test_interrupted_run_resumes_without_duplicates(tmp_path):
    with FakeOpenAIServer() as server:
        reqs = requests(10)
        first = LLMTextClient(cfg_for(server), tmp_path, api_key=KEY).run(reqs, max_calls=4)
        assert first.stats.http_calls == 4 and first.stats.skipped == 6
        second = LLMTextClient(cfg_for(server), tmp_path, api_key=KEY).run(reqs)
        assert second.stats.cache_hits == 4 and second.stats.http_calls == 6 and second.stats.complete
        assert server.requests == 10 and all(n == 1 for n in server.served.values())
        assert {k: v.text for k, v in second.results.items()} == {r.id: reply_for(r.prompt) for r in reqs}
        assert len(cache_files(tmp_path)) == 10


def test_key_never_logged_or_cached(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer() as server:
        server.faults.extend(["429", "500", "malformed"])
        LLMTextClient(cfg_for(server), tmp_path, api_key=KEY).run(requests(5))
        assert server.auth_headers and all(h == f"Bearer {KEY}" for h in server.auth_headers)
    assert caplog.text and KEY not in caplog.text
    for p in cache_files(tmp_path):
        assert KEY not in p.read_text()
        json.loads(p.read_text())  # complete JSON: written atomically


def test_missing_key_and_refused_request(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    from expvl.synthesis.llm_text import LLMError
    with FakeOpenAIServer() as server:
        client = LLMTextClient(cfg_for(server, api_key_env="NO_SUCH_KEY_VAR"), tmp_path)
        with pytest.raises(LLMError, match="NO_SUCH_KEY_VAR"):
            client.run(requests(1))
        bad = LLMTextClient(cfg_for(server, base_url=server.base_url[:-3] + "/nope"), tmp_path, api_key=KEY)
        with pytest.raises(LLMError, match="404"):
            bad.run(requests(1))


def test_add_llm_captions_on_records(tmp_path):
    rng = random.Random(0)
    records = []
    for i in range(6):
        active = set(rng.sample(SYNTHFACS_AUS, i % 4))  # record 0 and 4: no AU active
        aus = {a: int(a in active) for a in SYNTHFACS_AUS}
        r = Record(f"s/train/{i}", f"{i}.png", "t", "train", aus=aus, emotion="anger" if i % 2 else None)
        r.captions = text_rules.rule_captions(r.aus, r.emotion, record_rng(0, r.id, "text"))
        records.append(r)
    rule_fused = {r.id: r.captions.get("fused") for r in records}
    with FakeOpenAIServer() as server:
        stats = add_llm_captions(records, LLMTextClient(cfg_for(server), tmp_path, api_key=KEY))
    assert stats.complete and stats.fallbacks == 0
    for r in records:
        r.validate()
        active = r.positive_aus
        if active:
            assert r.captions["au_llm"] == reply_for(au_prompt(active))
        else:
            assert r.captions["au_llm"] == r.captions["au_rule"]  # the fixed no-AU description
        if r.emotion:
            assert r.captions["fused"] == reply_for(fusion_prompt(r.captions["au_llm"], r.captions["emotion"]))
            assert r.captions["fused"] != rule_fused[r.id]
        for kind, text in r.captions.items():
            if kind.startswith("region:"):
                region = kind.split(":", 1)[1]
                if any(a in active and __import__("expvl.vocab.facs", fromlist=["AUS"]).AUS[a].region == region
                       for a in active):
                    assert text.startswith("Synthetic reply")
                else:
                    assert text == text_rules.NEUTRAL_REGION[region]


def test_spend_limit_spans_both_phases_of_record_captioning(tmp_path):
    rng = random.Random(1)
    records = []
    for i in range(8):
        active = set(rng.sample(SYNTHFACS_AUS, 2))
        r = Record(f"s/train/{i}", f"{i}.png", "t", "train", aus={a: int(a in active) for a in SYNTHFACS_AUS},
                   emotion="fear")
        r.captions = text_rules.rule_captions(r.aus, r.emotion, record_rng(0, r.id, "text"))
        records.append(r)
    with FakeOpenAIServer() as server:
        client = LLMTextClient(cfg_for(server, concurrency=1, max_total_tokens=1), tmp_path, api_key=KEY)
        stats = add_llm_captions(records, client)
        assert server.requests == 1  # the first reply used the budget; the fusion phase made no call
    assert stats.spend_limit_reached and not stats.complete and stats.http_calls == 1
    for r in records:
        r.validate()


def test_variants_are_distinct_cache_entries(tmp_path):
    with FakeOpenAIServer() as server:
        client = LLMTextClient(cfg_for(server, samples_per_prompt=2), tmp_path, api_key=KEY)
        reqs = [LLMRequest(f"v{v}-{i}", "same prompt", fallback="x", variant=v) for v in (0, 1) for i in range(3)]
        batch = client.run(reqs)
        assert batch.stats.unique_prompts == 2 and server.requests == 2
        assert len(cache_files(tmp_path)) == 2 and len(batch.results) == 6
