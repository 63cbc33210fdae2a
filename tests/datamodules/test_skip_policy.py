"""Bad data under both policies: a record of the wrong shape names its shard and line; unreadable images
under policy "skip" are logged as they happen, and only a slot with nothing readable at all is an error."""

import logging

import pytest
import torch

from expvl.datamodules.sources import ShardError
from expvl.datamodules.stream import StreamConfig, StreamDataset
from tests.helpers.datasets import write_dataset


def _to_tensor(img) -> torch.Tensor:
    return torch.zeros(3, 2, 2)


@pytest.mark.parametrize("old, new, match", [
    ('"aus": {"AU1": 0, "AU12": 1}', '"aus": ["AU1"]', r"aus must be an object"),
    ('"aus": {"AU1": 0, "AU12": 1}', '"aus": {"AU1": true, "AU12": 1}', r"aus\['AU1'\] must be 0 or 1, got True"),
    ('"captions": {"emotion": "The face shows happiness."}', '"captions": "happy"', r"captions must be an object"),
    ('"question": "AU12 0?"', '"question": 12', r"vqa\[0\]: question must be a string, got int 12"),
])
def test_a_record_of_the_wrong_shape_names_shard_and_line_under_either_policy(tmp_path, caplog, old, new, match):
    root = write_dataset(tmp_path / "d", 6, 1, vqa=lambda i: 1)
    shard = root / "train-00000.jsonl"
    lines = shard.read_text().splitlines()
    assert old in lines[2]
    lines[2] = lines[2].replace(old, new)
    shard.write_text("\n".join(lines) + "\n")
    with pytest.raises(ShardError, match=r"train-00000\.jsonl:3: " + match):
        StreamDataset(root)
    with caplog.at_level(logging.WARNING):
        ds = StreamDataset(root, config=StreamConfig(policy="skip"))
    assert ds.index.skipped.count == 1 and ds.index.num_records == 5
    assert "skipped 1 malformed record" in caplog.text and "jsonl:3" in caplog.text


def _unreadable(root, ids):
    for i in ids:
        (root / f"images/{i:04d}.png").write_bytes(b"not a png")


def test_half_the_images_unreadable_trains_on_the_rest_and_says_so_at_once(tmp_path, caplog):
    root = write_dataset(tmp_path / "d", 16, 1, images=True)
    _unreadable(root, range(0, 16, 2))
    ds = StreamDataset(root, transform=_to_tensor, config=StreamConfig(policy="skip", shuffle=False))
    with caplog.at_level(logging.WARNING):
        batches = iter(ds.loader(batch_size=4))
        first = next(batches)
        # logged before the epoch ends: the first unreadable image, by path and record
        assert "skipped unreadable image" in caplog.text and "0000.png" in caplog.text and "'r0000'" in caplog.text
        rest = list(batches)
        del batches  # the loader's iterator let go (an epoch's end): the stream's summary line
    ids = [r.id for b in [first, *rest] for r in b["records"]]
    assert len(ids) == 16 and all(int(i[1:]) % 2 for i in ids)  # the slot's 16 samples, readable ones repeated
    assert "skipped 8 unreadable image(s)" in caplog.text


def test_a_run_that_stops_mid_epoch_still_reports_what_it_skipped(tmp_path, caplog):
    root = write_dataset(tmp_path / "d", 16, 1, images=True)
    _unreadable(root, [1, 2, 3])
    ds = StreamDataset(root, transform=_to_tensor, config=StreamConfig(policy="skip", shuffle=False))
    with caplog.at_level(logging.WARNING):
        batches = iter(ds.loader(batch_size=2))
        next(batches)
        next(batches)
        del batches  # what the trainer does at max_steps: the stream is closed, not exhausted
    assert "skipped 3 unreadable image(s)" in caplog.text


def test_no_readable_image_at_all_is_an_error_naming_one(tmp_path):
    root = write_dataset(tmp_path / "d", 6, 1, images=True)
    _unreadable(root, range(6))
    ds = StreamDataset(root, transform=_to_tensor, config=StreamConfig(policy="skip", shuffle=False))
    with pytest.raises(RuntimeError, match=r"no readable image in a full pass .*first unreadable: .*0000\.png"):
        list(ds.loader(batch_size=2))
