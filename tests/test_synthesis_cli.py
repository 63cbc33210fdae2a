"""Shard writing / reading and the `python -m synthesis` pipeline end to end (tiny SynthFACS)."""


import pytest

from synthesis.records import Record, RecordError
from synthesis.shards import ShardError, iter_shard_records, read_manifest, write_shards
from tests.fake_openai_server import FakeOpenAIServer

TINY = ["synthfacs.n_train=12", "synthfacs.n_val=4", "synthfacs.n_test=4", "synthfacs.size=64",
        "synthfacs.workers=1", "synthfacs.n_identities_train=4", "synthfacs.n_identities_test=2",
        "shard_size=5"]


def rec(i, split="train", **kw):
    return Record(f"x/{split}/{i}", f"images/{i}.png", "test", split, aus={"AU1": i % 2}, **kw)


def test_write_and_read_shards(tmp_path):
    recs = {"train": [rec(i) for i in range(7)], "test": [rec(i, "test") for i in range(2)]}
    m = write_shards(tmp_path, recs, cfg_hash="h1", seed=3, shard_size=3)
    assert m["complete"] and m["seed"] == 3 and m["config_hash"] == "h1"
    assert [(s["split"], s["records"]) for s in m["shards"]] == [("train", 3), ("train", 3), ("train", 1), ("test", 2)]
    assert m["splits"] == {"train": 7, "test": 2}
    assert m["counts"]["train"]["aus"] == {"AU1": 3}
    assert [r.id for r in iter_shard_records(tmp_path, "train")] == [r.id for r in recs["train"]]
    assert len(list(iter_shard_records(tmp_path))) == 9
    # same config again: identical shards are not rewritten (resume)
    shard = tmp_path / m["shards"][0]["path"]
    mtime = shard.stat().st_mtime_ns
    write_shards(tmp_path, recs, cfg_hash="h1", seed=3, shard_size=3)
    assert shard.stat().st_mtime_ns == mtime
    # another config: refused, both hashes named
    with pytest.raises(ShardError, match="h1.*h2"):
        write_shards(tmp_path, recs, cfg_hash="h2", seed=3, shard_size=3)
    assert not list(tmp_path.rglob("*.tmp"))


def test_bad_records_and_lines_are_named(tmp_path):
    bad = rec(1)
    bad.aus["AU1"] = 2
    with pytest.raises(RecordError, match=r"x/train/1.*aus\['AU1'\]"):
        write_shards(tmp_path / "a", {"train": [rec(0), bad]}, cfg_hash="h", seed=0, shard_size=10)
    assert read_manifest(tmp_path / "a") is None  # nothing claimed the folder
    with pytest.raises(ShardError, match="duplicate"):
        write_shards(tmp_path / "b", {"train": [rec(0), rec(0)]}, cfg_hash="h", seed=0, shard_size=10)
    m = write_shards(tmp_path / "c", {"train": [rec(i) for i in range(3)]}, cfg_hash="h", seed=0, shard_size=10)
    path = tmp_path / "c" / m["shards"][0]["path"]
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"AU1": 1', '"AU99": 1')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=r"train-00000.jsonl line 2: aus: unknown action unit 'AU99'"):
        list(iter_shard_records(tmp_path / "c"))


def test_cli_rule_pipeline_resume_and_refusal(tmp_path, capsys):
    from synthesis.__main__ import main

    out = tmp_path / "ds"
    s = main([f"out_dir={out}", *TINY, "--contact-sheet"])
    assert s["complete"] and s["skipped"] == [] and s["records"] == {"train": 12, "val": 4, "test": 4}
    m = read_manifest(out)
    assert m["complete"] and m["config_hash"] == s["hashes"]["vqa"] and m["image_root"] == "."
    assert (out / "contact_sheet.png").exists() and (out / "synthesis_config.yaml").exists()
    records = list(iter_shard_records(out))
    assert len({r.id for r in records}) == 20
    for r in records:
        assert (out / r.image).exists() and r.vqa and "au_rule" in r.captions
    assert m["counts"]["train"]["vqa"]["q3"] == sum(p.type == "q3" for r in records if r.split == "train" for p in r.vqa)
    try:  # the reader in datamodules/ understands this manifest (skip while it is in flux)
        from datamodules.sources import discover_shards
    except ImportError:
        discover_shards = None
    if discover_shards is not None:
        assert sum(sh.records for sh in discover_shards(out, split="train")) == 12
    again = main([f"out_dir={out}", *TINY])
    assert again["skipped"] == ["labels", "text", "vqa"]
    with pytest.raises(ShardError, match=s["hashes"]["text"]):
        main([f"out_dir={out}", *TINY, "text.regions=false"])
    assert main(["render", f"out_dir={tmp_path / 'r'}", *TINY])["hashes"].keys() == {"labels"}
    assert not (tmp_path / "r" / "manifest.json").exists()


def test_cli_llm_run_interrupted_then_resumed(tmp_path, monkeypatch):
    from synthesis.__main__ import main

    monkeypatch.setenv("OPENAI_API_KEY", "sk-cli-secret-42")
    out = tmp_path / "ds"
    with FakeOpenAIServer() as server:
        server.faults.extend(["500", "429", "kill"])
        args = [f"out_dir={out}", *TINY, "text.llm.enabled=true", f"text.llm.base_url={server.base_url}",
                "text.llm.backoff_base_s=0.01", "text.llm.timeout_s=2"]
        first = main([*args, "--max-llm-calls", "5"])
        assert not first["complete"] and first["llm"]["skipped"] > 0
        assert read_manifest(out)["complete"] is False
        second = main(args)
        assert second["complete"] and second["llm"]["skipped"] == 0 and second["skipped"] == ["labels"]
        assert second["llm"]["cache_hits"] >= 2
        assert all(n == 1 for n in server.served.values())  # no prompt answered twice
    records = list(iter_shard_records(out))
    assert len(records) == len({r.id for r in records}) == 20
    for r in records:
        if r.positive_aus:
            assert r.captions["au_llm"].startswith("Synthetic reply")
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml"):
            assert "sk-cli-secret-42" not in path.read_text()


def test_cli_reader_source_with_random_split(tmp_path):
    from synthesis.__main__ import main

    data = tmp_path / "csvdata"
    data.mkdir()
    rows = ["image,AU1,AU4,AU12,AU25,emotion"]
    rows += [f"faces/{i:03d}.jpg,{i % 2},{(i // 2) % 2},{(i // 3) % 2},,{['happiness', 'anger', ''][i % 3]}"
             for i in range(20)]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "ds"
    s = main([f"out_dir={out}", "source=csv", f"source_root={data}", "test_fraction=0.25", "vqa.heldout_aus=[AU4]"])
    assert s["records"] == {"train": 15, "test": 5} and s["complete"]
    records = list(iter_shard_records(out))
    assert all(r.image.startswith(str(data.resolve())) for r in records)
    assert all("AU25" not in r.aus for r in records)  # empty cell = not annotated: never asked
    assert not any(p.au == "AU4" for r in records if r.split == "train" for p in r.vqa if p.type == "q3")
    assert any(p.au == "AU4" for r in records if r.split == "test" for p in r.vqa if p.type == "q3")
