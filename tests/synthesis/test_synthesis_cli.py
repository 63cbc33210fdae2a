"""Shard writing / reading and the `python -m synthesis` pipeline end to end (tiny SynthFACS), and
real-dataset readers driven from the command line (fake BP4D / DISFA trees): reader options,
subject-exclusive train / val / test splits, misspelled options."""


import typing

import pytest

from expvl.configs import ConfigError
from expvl.vocab.facs import DATASET_AUS
from expvl.vocab.records import Record, RecordError
from expvl.vocab.shards import ShardError, iter_shard_records, read_manifest, read_split_records, write_shards
from tests.helpers.datasets import BP4D_HEADER, bp4d_row, write_disfa, write_file
from tests.helpers.fake_openai_server import FakeOpenAIServer

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
    from expvl.synthesis.build import main

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
        from expvl.datamodules.sources import discover_shards
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
    from expvl.synthesis.build import main

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
    from expvl.synthesis.build import main

    data = tmp_path / "csvdata"
    data.mkdir()
    rows = ["image,AU1,AU4,AU12,AU25,emotion"]
    rows += [f"faces/{i:03d}.jpg,{i % 2},{(i // 2) % 2},{(i // 3) % 2},,{['happiness', 'anger', ''][i % 3]}"
             for i in range(20)]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "ds"
    s = main([f"out_dir={out}", "source=csv", f"source_root={data}", "split.test_fraction=0.25", "vqa.heldout_aus=[AU4]"])
    assert s["records"] == {"train": 15, "test": 5} and s["complete"]
    records = list(iter_shard_records(out))
    assert all(r.image.startswith(str(data.resolve())) for r in records)
    assert all("AU25" not in r.aus for r in records)  # empty cell = not annotated: never asked
    assert not any(p.au == "AU4" for r in records if r.split == "train" for p in r.vqa if p.type == "q3")
    assert any(p.au == "AU4" for r in records if r.split == "test" for p in r.vqa if p.type == "q3")


# ------------------------------------------------------------------ real-dataset readers from the CLI

BP4D_SUBJECTS = ["F001", "M007", "M011", "F003", "F007", "F015"]  # two of each BP4D_FOLDS part


def _fake_bp4d(root):
    """Six subjects, one 12-frame video each: AU6 on at frames 104-105, AU2 on at 108."""
    rows = [bp4d_row(100 + i, on=("AU6",) if i in (4, 5) else ("AU2",) if i == 8 else ()) for i in range(12)]
    for subject in BP4D_SUBJECTS:
        write_file(root / f"AUCoding/AU_OCC/{subject}_T1.csv", BP4D_HEADER + "\n" + "\n".join(rows) + "\n")
    return root


def _fake_disfa(root, subjects=("SN001", "SN002", "SN003", "SN004", "SN005", "SN006", "SN007", "SN008")):
    """All 12 DISFA AUs, four frames per subject; AU15 (not in the 8-AU default) at intensity 3."""
    for subject in subjects:
        data = {int(a[2:]): [0, 1, 2, 3] for a in DATASET_AUS["disfa12"]}
        data[15] = [3, 3, 3, 3]
        write_disfa(root, subject, data)
    return root


def _subjects_by_split(out):
    return {sp: {r.subject for r in recs} for sp, recs in read_split_records(out).items()}


def test_every_reader_has_its_config_section():
    """`source=<name>` hands section `<name>` of the config to READERS[name]."""
    from expvl.synthesis.config import SynthesisConfig
    from expvl.synthesis.readers import READERS

    cfg = SynthesisConfig()
    for name, reader in READERS.items():
        assert typing.get_type_hints(reader)["config"] == type(getattr(cfg, name)) | None, name


def test_cli_bp4d_reader_options_and_fold_split(tmp_path):
    from expvl.datamodules.sources import discover_shards
    from expvl.synthesis.build import main

    data = _fake_bp4d(tmp_path / "BP4D")
    out = tmp_path / "ds"
    s = main([f"out_dir={out}", "source=bp4d", f"source_root={data}", "bp4d.aus=[1,6,12]",
              "bp4d.frame_sampling=true", "bp4d.sample_every=5", "bp4d.image_template=S/{subject}/{frame:04d}.jpg",
              "split.fold_protocol=bp4d", "split.test_fold=3", "split.val_fraction=0.2"])
    assert s["complete"] and s["records"] == {"train": 15, "val": 5, "test": 10}
    records = list(iter_shard_records(out))
    for r in records:
        assert set(r.aus) == {"AU1", "AU6", "AU12"}
        assert r.image == str((data / f"S/{r.subject}/{r.meta['frame']:04d}.jpg").resolve())
    # 1 in 5 (100, 105, 110) + AU6 changes (104, 106); the AU2 change at 108 is outside bp4d.aus
    assert sorted(r.meta["frame"] for r in records if r.subject == "F001") == [100, 104, 105, 106, 110]
    by_split = _subjects_by_split(out)
    assert by_split["test"] == {"F007", "F015"}  # BP4D_FOLDS part 3
    assert len(by_split["val"]) == 1 and len(by_split["train"]) == 3
    assert set.union(*by_split.values()) == set(BP4D_SUBJECTS)
    assert sum(len(subjects) for subjects in by_split.values()) == len(BP4D_SUBJECTS)  # no subject twice
    assert {r.split for r in records if r.subject in by_split["val"]} == {"val"}
    # the training datamodules' reader finds the splits it asks for
    assert sum(sh.records for sh in discover_shards(out, split="train")) == 15
    assert sum(sh.records for sh in discover_shards(out, split="val")) == 5


def test_cli_disfa_subject_split_is_exclusive_and_seeded(tmp_path):
    from expvl.synthesis.build import main

    data = _fake_disfa(tmp_path / "DISFA")

    def split(name, *overrides):
        out = tmp_path / name
        main(["render", f"out_dir={out}", "source=disfa", f"source_root={data}",
              "disfa.aus=[1,2,4,5,6,9,12,15,17,20,25,26]", "split.test_fraction=0.25", "split.val_fraction=0.25",
              *overrides])
        return out

    out = split("a")
    records = read_split_records(out / "stages" / "labels")
    assert {sp: len(recs) for sp, recs in records.items()} == {"train": 16, "val": 8, "test": 8}
    r = records["train"][0]
    assert set(r.aus) == set(DATASET_AUS["disfa12"]) and r.aus["AU15"] == 1 and r.intensities["AU15"] == 3.0
    assert [x.aus["AU1"] for x in records["train"][:4]] == [0, 0, 1, 1]  # intensity >= 2
    subjects = {sp: {x.subject for x in recs} for sp, recs in records.items()}
    assert [len(subjects[sp]) for sp in ("train", "val", "test")] == [4, 2, 2]
    assert not (subjects["train"] & subjects["val"] or subjects["train"] & subjects["test"]
                or subjects["val"] & subjects["test"])
    again = split("b")
    assert _subjects_by_split(again / "stages" / "labels") == subjects  # same seed, same subjects
    others = [_subjects_by_split(split(f"seed{k}", f"seed={k}") / "stages" / "labels") for k in (1, 2, 3)]
    assert any(o != subjects for o in others)  # the seed draws the subjects


def test_cli_reader_option_mistakes_are_named(tmp_path):
    from expvl.synthesis.build import main

    data = _fake_bp4d(tmp_path / "BP4D")
    base = [f"out_dir={tmp_path / 'ds'}", "source=bp4d", f"source_root={data}"]
    with pytest.raises(ConfigError, match=r"unknown key 'bp4d.frame_samplng' \(did you mean 'bp4d.frame_sampling'"):
        main([*base, "bp4d.frame_samplng=true"])
    with pytest.raises(ConfigError, match=r"unknown key 'split.val_fractoin' \(did you mean 'split.val_fraction'"):
        main([*base, "split.val_fractoin=0.1"])
    with pytest.raises(ConfigError, match="bp4d.sample_every"):
        main([*base, "bp4d.sample_every=often"])
    with pytest.raises(ValueError, match=r"disfa\.\* options are set, but source is 'bp4d'"):
        main([*base, "disfa.frame_sampling=true"])
    with pytest.raises(ValueError, match="split.fold_protocol and split.test_fold go together"):
        main([*base, "split.fold_protocol=bp4d"])
    with pytest.raises(ValueError, match=r"subject\(s\) \['SN001'\].*in no fold of 'bp4d'"):
        main([f"out_dir={tmp_path / 'd2'}", "source=disfa", f"source_root={_fake_disfa(tmp_path / 'D', ['SN001'])}",
              "split.fold_protocol=bp4d", "split.test_fold=1"])
    with pytest.raises(ValueError, match="moved to split.test_fraction"):
        main([*base, "test_fraction=0.2"])
    assert not (tmp_path / "ds" / "manifest.json").exists()


# ------------------------------------------------------------------ what the built dataset may read

def test_cli_reader_images_stay_in_source_root_and_stream_from_there(tmp_path):
    import torch
    from PIL import Image

    from expvl.datamodules.stream import StreamConfig, StreamDataset
    from expvl.synthesis.build import main

    data = tmp_path / "csvdata"
    write_file(data / "labels.csv", "image,AU1,AU12,emotion\n" + "".join(f"faces/{i}.png,{i % 2},1,happiness\n"
                                                                         for i in range(4)))
    for i in range(4):
        (data / "faces").mkdir(exist_ok=True)
        Image.new("RGB", (6, 5), (i, 0, 0)).save(data / f"faces/{i}.png")
    out = tmp_path / "ds"
    main([f"out_dir={out}", "source=csv", f"source_root={data}", "csv.default_split=train"])
    assert read_manifest(out)["image_roots"] == [str(data.resolve())]  # the originals stay where they are
    stream = StreamDataset(out, split="train", transform=lambda im: torch.tensor(im.getpixel((0, 0))[0]),
                           config=StreamConfig(shuffle=False))
    assert sorted(next(iter(stream.loader(batch_size=4)))["images"].tolist()) == [0, 1, 2, 3]
    for bad in ("../secret.png", "/etc/hostname"):  # label files naming an image outside source_root
        write_file(data / "labels.csv", f"image,AU1,emotion\nfaces/0.png,1,happiness\n{bad},0,anger\n")
        with pytest.raises(ValueError, match=f"csv record 'csv/{bad}': image '{bad}' lies outside"):
            main([f"out_dir={tmp_path / 'bad'}", "source=csv", f"source_root={data}", "csv.default_split=train"])
        assert not (tmp_path / "bad" / "stages" / "labels" / "manifest.json").exists()


def test_cli_rerun_refuses_an_edited_shard(tmp_path):
    from expvl.synthesis.build import main

    out = tmp_path / "ds"
    main([f"out_dir={out}", *TINY])
    shard = out / read_manifest(out)["shards"][0]["path"]
    shard.write_text(shard.read_text().replace('"split": "train"', '"split": "train" ', 1))  # one space
    with pytest.raises(ShardError, match=r"train-00000\.jsonl: sha256 .* differs from the manifest's"):
        main([f"out_dir={out}", *TINY])  # the finished stage is not read back as if it were the one written
