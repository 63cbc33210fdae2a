"""Reading a shard set back (`read_split_records`, what evaluation, the feature cache and the bootstrap
read) checks it is the data its manifest describes: sha256 per shard, no shard listed twice, no record id
in two places, no image path leaving the set's folders; writing refuses an id in two splits."""

import hashlib
import json

import pytest

from expvl.vocab.records import Record, RecordError
from expvl.vocab.shards import ShardError, image_outside, read_split_records, write_shards


def rec(rid, split="train", image=None):
    return Record(rid, image or f"images/{rid}.png", "t", split, aus={"AU1": 0})


def written(root, **splits):
    m = write_shards(root, {sp: [rec(i, sp) for i in ids] for sp, ids in splits.items()}, cfg_hash="h", seed=0,
                     shard_size=2)
    return root, m


def test_write_refuses_an_id_in_two_splits(tmp_path):
    with pytest.raises(ShardError, match="record id 'b' is in split 'train' and in split 'test'"):
        written(tmp_path, train=["a", "b"], test=["b"])
    assert not (tmp_path / "manifest.json").exists()


def test_an_edited_shard_is_refused(tmp_path):
    root, m = written(tmp_path, train=["a", "b", "c"])
    assert [r.id for r in read_split_records(root)["train"]] == ["a", "b", "c"]
    shard = root / m["shards"][1]["path"]
    shard.write_text(shard.read_text().replace('"AU1": 0', '"AU1": 1'))
    with pytest.raises(ShardError, match=r"train-00001\.jsonl: sha256 [0-9a-f]{16} differs from the manifest's"):
        read_split_records(root)


def test_an_id_in_two_splits_is_refused_on_read(tmp_path):
    root, m = written(tmp_path, train=["a", "b"], test=["c"])
    entry = m["shards"][1]
    data = rec("a", "test").to_json() + "\n"  # the test shard rewritten to hold a training face ...
    (root / entry["path"]).write_text(data)
    entry["sha256"] = hashlib.sha256(data.encode()).hexdigest()  # ... and the manifest with it
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="record id 'a' is in split 'train' and in split 'test'"):
        read_split_records(root)


def test_a_shard_listed_twice_is_refused(tmp_path):
    root, m = written(tmp_path, train=["a", "b"])
    m["shards"].append(dict(m["shards"][0]))
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"shards\[1\] lists 'shards/train-00000.jsonl' again \(as shards\[0\]\)"):
        read_split_records(root)


@pytest.mark.parametrize("image", ["../../etc/passwd", "/etc/passwd", "images/../../x.png"])
def test_an_image_path_leaving_the_set_is_refused(tmp_path, image):
    root = tmp_path / "d"
    write_shards(root, {"train": [rec("a"), rec("b", image=image)]}, cfg_hash="h", seed=0, shard_size=5)
    with pytest.raises(RecordError, match=r"train-00000\.jsonl line 2: record 'b': image .* lies outside"):
        read_split_records(root)


def test_image_outside_judges_the_written_path():
    roots = ["/data/set", "/data/originals"]
    assert image_outside("images/a.png", "/data/set", roots) is None
    assert image_outside("/data/originals/x/a.png", "/data/set", roots) is None
    assert image_outside("a/../b.png", "/data/set", roots) is None  # stays inside
    assert image_outside("../set2/a.png", "/data/set", roots)  # a sibling sharing the prefix is outside
    assert image_outside("/data/originals2/a.png", "/data/set", roots)
