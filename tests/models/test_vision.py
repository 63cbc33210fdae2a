"""VisionEncoder: token shapes, layer choice against a manual block loop, freezing, weights, precision."""

import copy
import socket
import urllib.request

import open_clip
import pytest
import torch
from PIL import Image

from expvl.models.convert.weights import CheckpointError
from expvl.models.vision import PRESETS, VisionConfig, VisionEncoder, build_clip


def _images(b=2, s=64, seed=0):
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _timm_custom(timm_name, pool):
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    return {"embed_dim": 32, "vision_cfg": {"timm_model_name": timm_name, "timm_pool": pool, "timm_proj": "linear"},
            "text_cfg": text}


_ATTN_POOL_VIT = {**PRESETS["tiny-vit"]["custom"],  # CoCa-style attentional pooler head (open_clip's prune keeps it)
                  "vision_cfg": {**PRESETS["tiny-vit"]["custom"]["vision_cfg"], "attentional_pool": True,
                                 "attn_pooler_queries": 4, "attn_pooler_heads": 2}}
# every tower family vision.py adapts: open_clip ViT (plain and attention-pooled), ModifiedResNet, timm trunks
TOWERS = {"tiny-vit": {}, "tiny-conv": {}, "attn-pool-vit": {"custom": _ATTN_POOL_VIT},
          "timm-vit": {"custom": _timm_custom("test_vit", "token")},
          "timm-convnext": {"custom": _timm_custom("test_convnext", "avg")}}


def _config(tower, **overrides):
    preset = "tiny-conv" if tower == "tiny-conv" else "tiny-vit"  # 64 px; `custom` replaces the architecture
    return VisionConfig.from_name(preset, **{**TOWERS[tower], **overrides})


@pytest.mark.parametrize("name,n,d", [("tiny-vit", 17, 64), ("tiny-conv", 16, 256)])
def test_token_shapes_at_64px(name, n, d):
    enc = VisionEncoder(VisionConfig.from_name(name))
    tokens = enc(_images())
    assert tokens.shape == (2, n, d) and (enc.num_tokens, enc.width) == (n, d)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-conv"])
@pytest.mark.parametrize("layer", [0, 1, -1])
def test_declared_shape_matches_forward_at_every_layer(name, layer):
    enc = VisionEncoder(VisionConfig.from_name(name, layer=layer))
    assert enc(_images(1)).shape == (1, enc.num_tokens, enc.width)


def test_penultimate_vit_layer_is_the_input_of_the_last_block():
    cfg = VisionConfig.from_name("tiny-vit", layer=-2)
    clip = build_clip(cfg)
    enc, v, x = VisionEncoder.from_clip(cfg, clip), clip.visual, _images()  # v: the unpruned tower
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


@pytest.mark.parametrize("tower", TOWERS)
def test_trained_tower_gives_every_parameter_a_gradient(tower):
    """DDP (find_unused_parameters=False) fails on a trainable parameter outside the graph: the blocks
    after `layer`, the final norm and the pooled head must be gone, not idle (timm test_models style)."""
    enc = VisionEncoder(_config(tower, freeze=False))
    enc.train()
    enc(_images()).square().mean().backward()
    trainable = {n: p for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable
    assert [n for n, p in trainable.items() if p.grad is None] == []     # names the idle ones
    assert not any(p.requires_grad for p in VisionEncoder(_config(tower)).parameters())


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("layer", [0, -2])
def test_pruning_keeps_the_tokens_and_drops_only_what_never_ran(tower, layer):
    cfg = _config(tower, layer=layer)
    clip = build_clip(cfg)
    enc = VisionEncoder.from_clip(cfg, clip)
    unpruned = copy.deepcopy(enc)
    unpruned.visual = clip.visual.eval()                   # the same forward over the whole tower
    x = _images()
    with torch.no_grad():
        assert torch.equal(enc(x), unpruned(x))
    kept, full = set(enc.state_dict()), set(unpruned.state_dict())
    assert kept < full
    if tower == "tiny-vit" and layer == -2:
        assert full - kept >= {"visual.ln_post.weight", "visual.proj", "visual.transformer.resblocks.1.mlp.c_fc.weight"}


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


@pytest.mark.parametrize("tower", ["tiny-conv", "tiny-vit", "timm-vit"])
def test_pruned_tower_file_round_trips_but_does_not_fill_a_deeper_layer(tmp_path, tower):
    src = VisionEncoder(_config(tower, freeze=False))
    path = str(tmp_path / "visual.pt")                     # as pipeline.step_encoder saves it: "visual.*" keys
    torch.save({f"visual.{k}": v for k, v in src.visual.state_dict().items()}, path)
    dst = VisionEncoder(_config(tower, pretrained=path))
    torch.testing.assert_close(dst(_images()), src.eval()(_images()))   # eval: BatchNorm's running stats
    assert dst.state_dict().keys() == src.state_dict().keys()
    with pytest.raises(CheckpointError, match="missing keys"):   # layer -1 needs the block this file lacks
        VisionEncoder(_config(tower, pretrained=path, layer=-1))
    with pytest.raises(CheckpointError, match="missing keys"):
        build_clip(_config(tower, pretrained=path))


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
    extra = str(tmp_path / "extra.pt")                    # keys of pruned parts are ignored, unknown ones are not
    torch.save({**build_clip(VisionConfig.from_name("tiny-vit")).state_dict(), "visual.bogus": torch.zeros(1)}, extra)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['visual.bogus'\]"):
        VisionEncoder(VisionConfig.from_name("tiny-vit", pretrained=extra))


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
    clip = build_clip(VisionConfig.from_name(name))
    fp32 = VisionEncoder.from_clip(VisionConfig.from_name(name), clip)
    bf16 = VisionEncoder.from_clip(VisionConfig.from_name(name, precision="bf16"), clip)
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


@pytest.mark.parametrize("tower", ["timm-vit", "timm-convnext"])
def test_timm_towers_declared_shapes_match_forward(tower):
    for layer in (0, -1):
        enc = VisionEncoder(_config(tower, layer=layer))
        assert enc(_images(1)).shape == (1, enc.num_tokens, enc.width)


def test_clip_pretraining_path_then_encoder_from_it():
    """build_clip + clip_tokenizer + open_clip.ClipLoss learn a fixed batch; from_clip keeps the trained tower."""
    from expvl.models.vision import clip_tokenizer
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
    with torch.no_grad():  # tiny-vit's layer -2: the output of block 0 of the trained tower
        h = clip.visual.transformer.resblocks[0](clip.visual._embeds(images))
        torch.testing.assert_close(enc(images), h)


def test_position_code_only_where_tokens_have_none():
    from expvl.models.position_code import image_position_code, sincos_2d

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
    from expvl.models.blip2 import Blip2, Blip2Config

    vision = VisionEncoder(VisionConfig.from_name("tiny-conv"))
    with_code = Blip2(Blip2Config(stage="pretrain", image_position="auto"), vision=vision)
    without = Blip2(Blip2Config(stage="pretrain", image_position="none"), vision=vision)
    without.load_state_dict(with_code.state_dict())  # same keys: the code is a function of the tower
    feats = torch.randn(2, 16, 256)
    torch.testing.assert_close(with_code.embed_features(feats) - without.embed_features(feats),
                               with_code.image_pos.expand(2, -1, -1))
