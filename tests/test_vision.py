"""VisionEncoder: token shapes, layer choice against a manual block loop, freezing, weights, precision."""

import socket
import urllib.request

import open_clip
import pytest
import torch
from PIL import Image

from models.convert import CheckpointError
from models.vision import VisionConfig, VisionEncoder, build_clip


def _images(b=2, s=64, seed=0):
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,n,d", [("tiny-vit", 17, 64), ("tiny-conv", 16, 256)])
def test_token_shapes_at_64px(name, n, d):
    enc = VisionEncoder(VisionConfig.from_name(name))
    tokens = enc(_images())
    assert tokens.shape == (2, n, d) and (enc.num_tokens, enc.width) == (n, d)
    assert enc.encode_image_clip(_images()).ndim == 2


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-conv"])
@pytest.mark.parametrize("layer", [0, 1, -1])
def test_declared_shape_matches_forward_at_every_layer(name, layer):
    enc = VisionEncoder(VisionConfig.from_name(name, layer=layer))
    assert enc(_images(1)).shape == (1, enc.num_tokens, enc.width)


def test_penultimate_vit_layer_is_the_input_of_the_last_block():
    enc = VisionEncoder(VisionConfig.from_name("tiny-vit", layer=-2))
    v, x = enc.visual, _images()
    with torch.no_grad():
        h = v._embeds(x)                                  # (B, 1 + 16, D), CLS first
        for blk in v.transformer.resblocks[:-1]:
            h = blk(h)
        last = v.transformer.resblocks[-1](h)
        tokens = enc(x)
    torch.testing.assert_close(tokens, h)
    assert not torch.allclose(tokens, last)               # the last block is really skipped


def test_conv_tokens_are_the_stage3_map_flattened_row_major():
    enc = VisionEncoder(VisionConfig.from_name("tiny-conv"))
    v, x = enc.visual, _images()
    with torch.no_grad():
        fmap = v.layer3(v.layer2(v.layer1(v.stem(x))))     # (B, 256, 4, 4)
        tokens = enc(x)
    torch.testing.assert_close(tokens, fmap.permute(0, 2, 3, 1).reshape(2, 16, 256))


def test_frozen_tower_has_no_grads_and_stays_in_eval():
    enc = VisionEncoder(VisionConfig.from_name("tiny-conv", freeze=True))
    enc.train()
    assert enc.training and not any(m.training for m in enc.visual.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    running = enc.visual.bn1.running_mean.clone()
    out = enc(_images())
    assert not out.requires_grad
    torch.testing.assert_close(enc.visual.bn1.running_mean, running)   # BatchNorm stats untouched


def test_trainable_tower_gets_gradients_on_the_blocks_it_uses():
    enc = VisionEncoder(VisionConfig.from_name("tiny-vit", freeze=False, layer=-1))
    enc.train()
    assert enc.visual.training
    enc(_images()).square().mean().backward()
    used = [p for n, p in enc.visual.named_parameters() if n.startswith(("transformer.", "conv1", "ln_pre"))]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in used)


def test_grad_checkpointing_does_not_change_outputs_or_grads():
    torch.manual_seed(0)
    cfg = VisionConfig.from_name("tiny-vit", freeze=False, layer=-1)
    a = VisionEncoder(cfg)
    b = VisionEncoder(VisionConfig.from_name("tiny-vit", freeze=False, layer=-1, grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    x = _images()
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    ya.sum().backward(), yb.sum().backward()
    torch.testing.assert_close(a.visual.conv1.weight.grad, b.visual.conv1.weight.grad)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 64, 64), (3, 64, 64)])
def test_wrong_image_shape_names_expected_and_got(shape):
    enc = VisionEncoder(VisionConfig.from_name("tiny-vit"))
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\).*got " + str(shape).replace("(", r"\(").replace(")", r"\)")):
        enc(torch.zeros(shape))


def test_layer_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="layer=5 out of range.*2 blocks"):
        VisionEncoder(VisionConfig.from_name("tiny-vit", layer=5))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_pretrained_round_trip_full_clip_file(tmp_path, suffix):
    cfg = VisionConfig.from_name("tiny-vit")
    torch.manual_seed(1)
    clip = build_clip(cfg)
    path = str(tmp_path / f"clip{suffix}")
    if suffix == ".pt":
        torch.save(clip.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, path)
    loaded = VisionEncoder(VisionConfig.from_name("tiny-vit", pretrained=path))
    ref = VisionEncoder.from_clip(cfg, clip)
    fresh = VisionEncoder(cfg)
    x = _images()
    torch.testing.assert_close(loaded(x), ref(x))
    assert not torch.allclose(fresh(x), ref(x))
    full = build_clip(VisionConfig.from_name("tiny-vit", pretrained=path))      # text side loads too
    torch.testing.assert_close(full.text_projection, clip.text_projection)


def test_visual_only_file_loads_into_the_encoder_but_not_a_full_clip(tmp_path):
    cfg = VisionConfig.from_name("tiny-conv")
    src = VisionEncoder(cfg)
    path = str(tmp_path / "visual.pt")
    torch.save(src.state_dict(), path)                    # keys "visual.*", as open_clip names them
    dst = VisionEncoder(VisionConfig.from_name("tiny-conv", pretrained=path))
    torch.testing.assert_close(dst(_images()), src(_images()))
    with pytest.raises(CheckpointError, match="missing keys"):
        build_clip(VisionConfig.from_name("tiny-conv", pretrained=path))


def test_from_clip_copies_the_tower():
    cfg = VisionConfig.from_name("tiny-vit")
    clip = build_clip(cfg)
    enc = VisionEncoder.from_clip(cfg, clip)
    before = enc(_images())
    with torch.no_grad():
        clip.visual.conv1.weight.add_(1.0)
    torch.testing.assert_close(enc(_images()), before)
    assert not any(p.requires_grad for p in enc.parameters()) and clip.visual.conv1.weight.requires_grad


def test_missing_and_mismatched_files_are_clear_errors(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        VisionEncoder(VisionConfig.from_name("tiny-vit", pretrained=missing))
    other = str(tmp_path / "conv.pt")
    torch.save(build_clip(VisionConfig.from_name("tiny-conv")).state_dict(), other)
    with pytest.raises(CheckpointError, match="conv.pt"):
        VisionEncoder(VisionConfig.from_name("tiny-vit", pretrained=other))


def test_a_tag_that_needs_the_network_raises_without_trying_it(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert open_clip.get_pretrained_cfg("ViT-B-16", "openai")     # a real tag, so open_clip would download
    with pytest.raises(FileNotFoundError, match=r"never downloads.*pretrained=/path"):
        VisionEncoder(VisionConfig.from_name("vit-b-16", pretrained="openai"))
    with pytest.raises(FileNotFoundError, match="not an open_clip tag"):
        VisionEncoder(VisionConfig.from_name("vit-b-16", pretrained="no-such-tag"))


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-conv"])
def test_bf16_frozen_tower(name):
    fp32 = VisionEncoder(VisionConfig.from_name(name))
    bf16 = VisionEncoder.from_clip(VisionConfig.from_name(name, precision="bf16"), fp32)
    x = _images()
    tokens = bf16(x)
    assert tokens.dtype == torch.bfloat16
    ref = fp32(x)
    assert (tokens.float() - ref).norm() / ref.norm() < 0.05


def test_low_precision_needs_a_frozen_tower():
    with pytest.raises(ValueError, match="freeze=True"):
        VisionConfig.from_name("tiny-vit", precision="bf16", freeze=False)


def test_blip2_eva_g_shapes_on_meta():
    """EVA ViT-g/14 at 224 px: 40 blocks, layer -2 = block 38's output, 257 x 1408 tokens (reference §2.1)."""
    enc = VisionEncoder(VisionConfig.from_name("eva-g"), device="meta")
    assert (enc.num_tokens, enc.width, enc.layer_index) == (257, 1408, 38)


def test_transforms_produce_model_sized_tensors():
    for transform in ("open_clip", "blip2"):
        enc = VisionEncoder(VisionConfig.from_name("tiny-vit", transform=transform))
        img = Image.new("RGB", (80, 96), (200, 120, 40))
        for tf in (enc.train_transform, enc.eval_transform):
            assert tf(img).shape == (3, 64, 64)


@pytest.mark.parametrize("timm_name,pool", [("test_vit", "token"), ("test_convnext", "avg")])
def test_timm_towers_declared_shapes_match_forward(timm_name, pool):
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    custom = {"embed_dim": 32, "vision_cfg": {"timm_model_name": timm_name, "timm_pool": pool, "timm_proj": "linear"},
              "text_cfg": text}
    for layer in (0, -1):
        enc = VisionEncoder(VisionConfig(custom=custom, image_size=64, layer=layer))
        assert enc(_images(1)).shape == (1, enc.num_tokens, enc.width)


def test_clip_pretraining_path_then_encoder_from_it():
    """build_clip + clip_tokenizer + open_clip.ClipLoss learn a fixed batch; from_clip keeps the trained tower."""
    from models.vision import PRESETS, clip_tokenizer
    custom = dict(PRESETS["tiny-vit"]["custom"],     # cheapest towers: this is a plumbing test
                  text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    cfg = VisionConfig.from_name("tiny-vit", custom=custom)
    clip = build_clip(cfg)
    texts = clip_tokenizer(cfg)([f"face number {i} with brows raised {i % 3} times" for i in range(8)])
    images, loss_fn = _images(8, seed=3), open_clip.ClipLoss()
    opt = torch.optim.AdamW(clip.parameters(), lr=2e-3)
    clip.train()
    losses = []
    for _ in range(4):
        out = clip(images, texts)
        image_features, text_features, logit_scale = (out["image_features"], out["text_features"],
                                                      out["logit_scale"]) if isinstance(out, dict) else out
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    clip.eval()
    enc = VisionEncoder.from_clip(cfg, clip)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_image_clip(images), clip.encode_image(images))


def test_position_code_only_where_tokens_have_none():
    from models.vision import image_position_code, sincos_2d

    conv, vit = VisionEncoder(VisionConfig.from_name("tiny-conv")), VisionEncoder(VisionConfig.from_name("tiny-vit"))
    assert not conv.positional and vit.positional
    code = image_position_code(conv, "auto")
    assert code.shape == (16, 256) and image_position_code(vit, "auto") is None
    assert image_position_code(conv, "none") is None
    # every grid cell gets its own code (the point: cross-attention can now tell cells apart)
    assert torch.cdist(code, code).add(torch.eye(16) * 1e3).min() > 0.5
    forced = image_position_code(vit, "sincos2d")  # ViT: CLS row stays zero, 4 x 4 patch rows coded
    assert forced.shape == (17, vit.width) and forced[0].abs().sum() == 0
    torch.testing.assert_close(forced[1:], sincos_2d(4, vit.width))
    with pytest.raises(ValueError, match="image_position"):
        image_position_code(conv, "learned")


def test_blip2_adds_the_code_after_ln_vision_and_does_not_save_it():
    from models.blip2 import Blip2, Blip2Config

    vision = VisionEncoder(VisionConfig.from_name("tiny-conv"))
    with_code = Blip2(Blip2Config(stage="pretrain", image_position="auto"), vision=vision)
    without = Blip2(Blip2Config(stage="pretrain", image_position="none"), vision=vision)
    without.load_state_dict(with_code.state_dict())  # same keys: the code is a function of the tower
    feats = torch.randn(2, 16, 256)
    torch.testing.assert_close(with_code.embed_features(feats) - without.embed_features(feats),
                               with_code.image_pos.expand(2, -1, -1))
