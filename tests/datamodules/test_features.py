"""datamodules/features.py: the frozen-encoder feature cache is exact, resumable, and never stale."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

import expvl.datamodules.features as features_mod
from expvl.datamodules.features import FeatureStore
from expvl.vocab.records import Record

TRANSFORM = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])


class PatchEncoder(nn.Module):
    """(B, 3, 8, 8) -> (B, 4, 6) tokens; counts the images it encoded; can fail after `fail_after` calls."""

    def __init__(self, fail_after: int | None = None):
        super().__init__()
        self.proj = nn.Conv2d(3, 6, kernel_size=4, stride=4)
        self.calls, self.images, self.fail_after = 0, 0, fail_after

    def forward(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed mid-build")
        self.calls += 1
        self.images += len(x)
        return self.proj(x).flatten(2).transpose(1, 2)


@pytest.fixture
def faces(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        items.append((Record(id=f"r{i}", image=f"{i}.png", source="test", split="train"), tmp_path))
    return items


def _direct(encoder, items):
    with torch.no_grad():
        x = torch.stack([TRANSFORM(Image.open(root / r.image).convert("RGB")) for r, root in items])
        return encoder(x)


def test_lookup_returns_the_encoder_output(faces, tmp_path):
    torch.manual_seed(0)
    encoder = PatchEncoder()
    store = FeatureStore.build(encoder, TRANSFORM, faces, tmp_path / "cache", batch_size=3, progress=False)
    ids = ["r7", "r0", "r3"]
    expected = _direct(encoder, [faces[7], faces[0], faces[3]])
    torch.testing.assert_close(store.lookup(ids), expected, atol=2e-3, rtol=2e-3)  # stored in fp16
    with pytest.raises(KeyError, match="r99"):
        store.lookup(["r99"])
    encoded = encoder.images
    again = FeatureStore.build(encoder, TRANSFORM, faces, tmp_path / "cache", batch_size=3, progress=False)
    assert again.path == store.path and encoder.images == encoded  # reused, nothing re-encoded


def test_an_interrupted_build_resumes_where_it_recorded(faces, tmp_path, monkeypatch):
    monkeypatch.setattr(features_mod, "_SAVE_EVERY", 1)
    torch.manual_seed(0)
    encoder = PatchEncoder(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        FeatureStore.build(encoder, TRANSFORM, faces, tmp_path / "cache", batch_size=3, progress=False)
    encoder.fail_after, encoder.images = None, 0
    store = FeatureStore.build(encoder, TRANSFORM, faces, tmp_path / "cache", batch_size=3, progress=False)
    assert encoder.images == len(faces) - 6  # two batches of 3 were on disk
    torch.testing.assert_close(store.lookup([r.id for r, _ in faces]), _direct(encoder, faces),
                               atol=2e-3, rtol=2e-3)
    assert not list((tmp_path / "cache").glob("*.partial")) and not list((tmp_path / "cache").glob("*progress*"))


def test_a_rewritten_image_gets_a_new_cache(faces, tmp_path):
    torch.manual_seed(0)
    encoder = PatchEncoder()
    first = FeatureStore.build(encoder, TRANSFORM, faces, tmp_path / "cache", progress=False)
    r, root = faces[4]
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(root / r.image)
    st = os.stat(root / r.image)
    os.utime(root / r.image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later write, whatever the clock
    second = FeatureStore.build(encoder, TRANSFORM, faces, tmp_path / "cache", progress=False)
    assert second.path != first.path
    torch.testing.assert_close(second.lookup(["r4"]), _direct(encoder, [faces[4]]), atol=2e-3, rtol=2e-3)


def test_pickling_ships_the_path_not_the_tokens(faces, tmp_path):
    store = FeatureStore.build(PatchEncoder(), TRANSFORM, faces, tmp_path / "cache", progress=False)
    store.lookup(["r1"])  # opens the memory map
    blob = pickle.dumps(store)
    assert pickle.loads(blob)._features is None and len(blob) < 2000
    torch.testing.assert_close(pickle.loads(blob).lookup(["r1", "r2"]), store.lookup(["r1", "r2"]))


def test_duplicate_ids_are_refused(faces, tmp_path):
    with pytest.raises(ValueError, match="duplicate record ids"):
        FeatureStore.build(PatchEncoder(), TRANSFORM, faces + faces[:1], tmp_path / "cache", progress=False)
