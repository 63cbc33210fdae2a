"""The stream reads only the data its manifest describes: image paths stay inside the dataset's folders,
shards match their sha256, no shard or record is read twice, no record is in two splits, a shard edited
after indexing is named, and resuming a checkpoint over changed training data stops with the shard named."""

import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from expvl.datamodules.datamodule import DataConfig, StageDataModule
from expvl.datamodules.sources import ShardError, discover_shards
from expvl.datamodules.stream import StreamConfig, StreamDataset, collate_records
from expvl.vocab.records import Record
from expvl.vocab.shards import write_shards
from tests.helpers.datasets import make_record, write_dataset


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.resize((4, 4)))).permute(2, 0, 1).float() / 255


def synthesized(root, n=12, *, shard_size=4, splits=("train",), change=None):
    """A dataset folder as `python -m expvl.synthesis` writes it (manifest with sha256), with images.
    `change(record)` edits records before writing (a rerun over the same folder)."""
    recs = {sp: [Record(f"{sp}/{i}", f"images/{sp}-{i}.png", "t", sp, aus={"AU1": i % 2}) for i in range(n)]
            for sp in splits}
    for r in (r for rs in recs.values() for r in rs):
        if change:
            change(r)
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 5), (len(r.id), 0, 0)).save(root / r.image)
    write_shards(root, recs, cfg_hash="h", seed=0, shard_size=shard_size)
    return root


def rewrite_line(shard, line_no, edit):
    lines = shard.read_text().splitlines()
    lines[line_no - 1] = edit(lines[line_no - 1])
    shard.write_text("\n".join(lines) + "\n")


def ids_of(batches):
    return [r.id for b in batches for r in b["records"]]


# ------------------------------------------------------------------ image paths stay in the dataset

@pytest.mark.parametrize("escape", ["../secret.png", "images/../../secret.png", "ABSOLUTE"])
def test_image_paths_leaving_the_dataset_are_refused(tmp_path, escape, caplog):
    root = write_dataset(tmp_path / "d", 6, 1, images=True)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (6, 5), (9, 9, 9)).save(secret)
    image = str(secret) if escape == "ABSOLUTE" else escape
    rewrite_line(root / "train-00000.jsonl", 3, lambda line: line.replace('"images/0002.png"', json.dumps(image)))
    with pytest.raises(ShardError, match=r"train-00000\.jsonl:3: record 'r0002': image .* lies outside"):
        StreamDataset(root, transform=to_tensor)
    with caplog.at_level(logging.WARNING):  # policy "skip": dropped, counted, its file never opened
        ds = StreamDataset(root, transform=to_tensor, config=StreamConfig(policy="skip"))
    assert sorted(ids_of(ds.loader(batch_size=4))) == [f"r{i:04d}" for i in (0, 1, 3, 4, 5)]
    assert "skipped 1 malformed record" in caplog.text and "lies outside" in caplog.text


def test_absolute_paths_inside_the_dataset_or_its_image_roots_are_read(tmp_path):
    originals = tmp_path / "originals"  # a reader's source folder, listed in the manifest's image_roots
    originals.mkdir()
    Image.new("RGB", (6, 5), (7, 0, 0)).save(originals / "a.png")
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (6, 5), (8, 0, 0)).save(root / "images" / "b.png")
    recs = [Record("a", str(originals / "a.png"), "t", "train"), Record("b", str(root / "images" / "b.png"), "t", "train")]
    write_shards(root, {"train": recs}, cfg_hash="h", seed=0, shard_size=10, image_roots=[originals])
    batch = next(iter(StreamDataset(root, transform=to_tensor, config=StreamConfig(shuffle=False)).loader(batch_size=2)))
    assert batch["images"][:, 0, 0, 0].mul(255).round().tolist() == [7, 8]
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["image_roots"] = []  # without it the originals are outside
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="record 'a': image .*originals/a.png' lies outside"):
        StreamDataset(root)


# ------------------------------------------------------------------ shards are what the manifest hashed

def test_a_shard_edited_after_it_was_written_is_refused(tmp_path):
    root = synthesized(tmp_path / "d")
    assert len(StreamDataset(root).index.sha256) == 3
    shard = root / "shards" / "train-00001.jsonl"
    rewrite_line(shard, 1, lambda line: line.replace('"AU1": 0', '"AU1": 1'))  # still a valid record
    for policy in ("error", "skip"):
        with pytest.raises(ShardError, match=r"train-00001\.jsonl: sha256 [0-9a-f]{16} differs from the manifest's"):
            StreamDataset(root, config=StreamConfig(policy=policy))


def test_a_shard_edited_while_a_stream_holds_its_index_is_named(tmp_path):
    root = synthesized(tmp_path / "d")
    ds = StreamDataset(root)
    assert len(ids_of(ds.loader(batch_size=4))) == 12
    shard = root / "shards" / "train-00002.jsonl"
    shard.write_text(shard.read_text().replace('"source": "t"', '"source": "edited"'))
    with pytest.raises(ShardError, match=r"train-00002\.jsonl: changed after it was indexed"):
        list(ds.loader(batch_size=4))


# ------------------------------------------------------------------ nothing is read twice

def test_a_shard_listed_twice_is_refused(tmp_path):
    root = write_dataset(tmp_path / "d", 8, 2)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"].append({**manifest["shards"][0], "path": "./train-00000.jsonl"})
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"shards\[2\] lists './train-00000.jsonl' again \(as shards\[0\]\)"):
        StreamDataset(root)
    with pytest.raises(ShardError, match="listed twice"):
        StreamDataset([root / "train-00000.jsonl", root / "train-00000.jsonl"])


def test_a_record_id_twice_in_one_split_is_refused(tmp_path):
    root = write_dataset(tmp_path / "d", 8, 2)
    (root / "copy.jsonl").write_bytes((root / "train-00000.jsonl").read_bytes())  # a copied shard
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"].append({"path": "copy.jsonl", "split": "train", "records": 4})
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"record id 'r0000' at .*train-00000\.jsonl:1 \(split 'train'\) and "
                                         r"again at .*copy\.jsonl:1"):
        StreamDataset(root)


def stage_data(root, **kw):
    cfg = DataConfig(root=str(root), batch_size=3, val_split="", stream=StreamConfig(seed=1, buffer_size=4), **kw)
    return StageDataModule(cfg, expand=None, collate=collate_records)


def test_a_record_in_two_splits_is_refused_before_training(tmp_path):
    root = write_dataset(tmp_path / "d", 8, 1)
    test = make_record(5, split="test")  # r0005 is a training record too
    (root / "test-00000.jsonl").write_text(test.to_json() + "\n" + make_record(9, split="test").to_json() + "\n")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"].append({"path": "test-00000.jsonl", "split": "test", "records": 2})
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert len(discover_shards(root)) == 2  # each split alone is fine ...
    assert len(ids_of(StreamDataset(root, split="train").loader(batch_size=4))) == 8
    with pytest.raises(ShardError, match=r"record id 'r0005' at .*train-00000\.jsonl:6 \(split 'train'\) and "
                                         r"again at .*test-00000\.jsonl:1 \(split 'test'\)"):
        stage_data(root).train_dataloader()  # ... but a stage refuses to train on a test face


# ------------------------------------------------------------------ resume over changed data

def lightning_model():
    import lightning as L

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[str] = []

        def training_step(self, batch, batch_idx):
            self.seen += [r.id for r in batch["records"]]
            return (self.w * len(batch["records"])).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return L, Model


def test_resuming_over_changed_training_data_names_the_shard(tmp_path):
    L, Model = lightning_model()
    from lightning.pytorch.callbacks import ModelCheckpoint

    root = synthesized(tmp_path / "d")

    def fit(ckpt_dir, ckpt_path=None, **limits):
        model = Model()
        L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  max_epochs=1, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1)],
                  **limits).fit(model, stage_data(root), ckpt_path=ckpt_path)
        return model

    first = fit(tmp_path / "ck", max_steps=2)  # "killed" after step 2, its checkpoint holds the inputs
    ckpt = tmp_path / "ck" / "epoch=0-step=2.ckpt"
    state = torch.load(ckpt, weights_only=True)["StageDataModule"]
    assert set(state["inputs"]) == {f"shards/train-0000{i}.jsonl" for i in range(3)}
    same = fit(tmp_path / "ck2", ckpt_path=ckpt)  # unchanged data: resumes where it stopped
    assert Counter(first.seen + same.seen) == Counter(f"train/{i}" for i in range(12))
    # the same folder rewritten with one edited record: manifest and shard agree, the checkpoint does not
    synthesized(root, change=lambda r: r.aus.update(AU1=1) if r.id == "train/4" else None)
    with pytest.raises(ShardError, match=r"training data changed since the checkpoint being resumed: "
                                         r"shards/train-00001\.jsonl \(sha256 [0-9a-f]{16} then, [0-9a-f]{16} now\)"):
        fit(tmp_path / "ck3", ckpt_path=ckpt)
