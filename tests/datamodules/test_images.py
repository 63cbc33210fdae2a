"""load_image: every common PNG/JPEG mode becomes RGB with the right pixels; bad files raise ImageError
with their path."""

import numpy as np
import pytest
import torch
from PIL import Image

from expvl.datamodules.images import (
    ImageError,
    load_image,
    load_transformed,
    random_resized_crop,
    resolve_image,
)


def test_modes_become_rgb(tmp_path):
    cases = {
        "rgb.png": (Image.new("RGB", (7, 3), (10, 20, 30)), (10, 20, 30)),
        "gray.png": (Image.new("L", (3, 3), 77), (77, 77, 77)),
        "rgba.png": (Image.new("RGBA", (3, 3), (1, 2, 3, 0)), (1, 2, 3)),  # alpha dropped like open_clip
        "gray16.png": (Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16)), (255, 255, 255)),
        "mid16.png": (Image.fromarray(np.full((3, 3), 257 * 100, dtype=np.uint16)), (100, 100, 100)),
    }
    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.info["transparency"] = 0
    cases["palette.png"] = (pal, (200, 100, 50))
    for name, (img, rgb) in cases.items():
        img.save(tmp_path / name)
        out = load_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == img.size, name
        assert out.getpixel((1, 1)) == rgb, name


def test_jpeg_and_exif_orientation(tmp_path):
    img = Image.new("RGB", (8, 4), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    img.save(tmp_path / "a.jpg", exif=exif)
    out = load_image(tmp_path / "a.jpg")
    assert out.mode == "RGB" and out.size == (4, 8)
    assert abs(out.getpixel((2, 2))[0] - 200) < 8  # JPEG is lossy


def test_missing_corrupt_and_truncated_raise_with_path(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png: no such file") as e:
        load_image(tmp_path / "nope.png")
    assert e.value.path == str(tmp_path / "nope.png")
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    with pytest.raises(ImageError, match=r"garbage\.png: cannot decode image"):
        load_image(tmp_path / "garbage.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"t\.jpg: cannot decode image"):
        load_image(tmp_path / "t.jpg")


def test_transform_is_called_and_checked(tmp_path):
    Image.new("L", (5, 5), 255).save(tmp_path / "w.png")
    out = load_transformed(tmp_path / "w.png", lambda im: torch.tensor(np.array(im)).float())
    assert out.shape == (5, 5, 3) and out.min() == 255
    with pytest.raises(TypeError, match=r"w\.png: the image transform must return a torch\.Tensor"):
        load_transformed(tmp_path / "w.png", lambda im: np.array(im))


def test_resolve_image(tmp_path):
    assert resolve_image("images/a.png", tmp_path) == tmp_path / "images/a.png"
    assert resolve_image("/abs/a.png", tmp_path).as_posix() == "/abs/a.png"


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_batch_random_resized_crop(mode):
    # a horizontal ramp: each output column shows which input x it sampled
    ramp = torch.linspace(0, 1, 32).expand(4, 3, 32, 32).contiguous()
    same = random_resized_crop(ramp, scale=(1.0, 1.0), ratio=(1.0, 1.0), mode=mode)
    torch.testing.assert_close(same, ramp)  # the whole image: identity
    g = torch.Generator().manual_seed(0)
    out = random_resized_crop(ramp, scale=(0.25, 0.25), ratio=(1.0, 1.0), mode=mode, generator=g)
    assert out.shape == ramp.shape
    span = out[:, 0, 0, -1] - out[:, 0, 0, 0]  # a quarter of the area = half the width
    torch.testing.assert_close(span, torch.full((4,), 0.5), atol=0.04, rtol=0)
    assert out[:, 0, 0, 0].unique().numel() == 4  # each image got its own position
    overshoot = 0.0 if mode == "bilinear" else 1e-3  # bicubic may ring slightly past the ramp's ends
    assert (out >= -overshoot).all() and (out <= 1 + overshoot).all()  # inside the image, no padding values
    again = random_resized_crop(ramp, scale=(0.25, 0.25), ratio=(1.0, 1.0), mode=mode,
                                generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, out)  # seeded


def test_batch_crop_follows_the_train_transform():
    """The batched crop replaces the encoder's per-image RandomResizedCrop with its own settings."""
    from torchvision.transforms import Compose, InterpolationMode, RandomResizedCrop, ToTensor

    from expvl.training.bootstrap import batch_crop
    for interp, mode in ((InterpolationMode.BICUBIC, "bicubic"), (InterpolationMode.BILINEAR, "bilinear")):
        crop = batch_crop(Compose([RandomResizedCrop(16, scale=(0.5, 0.9), interpolation=interp), ToTensor()]))
        assert crop.keywords == {"scale": (0.5, 0.9), "ratio": (3 / 4, 4 / 3), "mode": mode}
    assert batch_crop(Compose([ToTensor()])) is None  # no crop to replace
