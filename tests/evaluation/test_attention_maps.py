"""Q-Former query-to-image attention maps (models/attention_maps.py): the recomputed probabilities
are the ones the model used (they reproduce the cross-attention module's output), masks and the
instruction-aware pass are honoured, and tokens land on the right grid cells."""

import pytest
import torch
from einops import rearrange

from expvl.evaluation.attention_maps import (
    cross_attention,
    cross_attention_layers,
    query_attention_maps,
    tokens_to_grid,
)
from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.qformer import QFormer, QFormerConfig
from expvl.models.vision import VisionConfig

torch.set_num_threads(1)


def _qformer(**overrides) -> QFormer:
    torch.manual_seed(0)
    cfg = QFormerConfig.from_name("tiny", num_layers=4, hidden_dropout=0.0, attention_dropout=0.0, **overrides)
    qf = QFormer(cfg).eval()
    with torch.no_grad():  # BERT init (std 0.02) gives near-uniform attention; sharpen it so the test bites
        for i in cross_attention_layers(qf):
            qf.layers[i].crossattention.self.query.weight.mul_(40)
            qf.layers[i].crossattention.self.key.weight.mul_(40)
    return qf


def _replay(qf: QFormer, out: dict) -> torch.Tensor:
    """The module's output rebuilt from our probabilities: probs @ V -> merge heads -> output block."""
    module = qf.layers[out["layer"]].crossattention
    y = out["probs_per_head"] @ out["kv"].v  # (B, H, Q, hd)
    return module.output(rearrange(y, "b h t d -> b t (h d)"), out["query_in"])


@pytest.mark.parametrize("layer", [None, 0])
def test_recomputed_attention_reproduces_the_module_output(layer):
    qf = _qformer()
    assert cross_attention_layers(qf) == [0, 2]
    image = torch.randn(3, 10, qf.cfg.encoder_width)
    out = cross_attention(qf, image, layer=layer)
    assert out["layer"] == (2 if layer is None else 0)
    B, Q, N = 3, qf.cfg.num_query_tokens, 10
    assert out["probs"].shape == (B, Q, N) and out["probs_per_head"].shape == (B, qf.cfg.num_heads, Q, N)
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(B, Q))
    assert out["probs"].max() > 0.3  # not uniform (1/N = 0.1): the replay below is a real check
    torch.testing.assert_close(_replay(qf, out), out["output"], atol=1e-5, rtol=1e-5)
    # a wrong map (e.g. heads in the wrong order) must NOT reproduce it
    wrong = {**out, "probs_per_head": out["probs_per_head"].flip(1)}
    assert not torch.allclose(_replay(qf, wrong), out["output"], atol=1e-3)


def test_image_mask_and_instruction_pass():
    qf = _qformer()
    image = torch.randn(2, 10, qf.cfg.encoder_width)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0
    out = cross_attention(qf, image, image_mask=mask)
    assert out["probs"][0, :, 6:].abs().max() == 0
    torch.testing.assert_close(_replay(qf, out), out["output"], atol=1e-5, rtol=1e-5)

    ids = torch.randint(5, 100, (2, 5))
    plain = cross_attention(qf, image)["probs"]
    instructed = cross_attention(qf, image, instruction_ids=ids, instruction_mask=torch.ones(2, 5, dtype=torch.long))
    torch.testing.assert_close(_replay(qf, instructed), instructed["output"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, instructed["probs"])  # the instruction changes where queries look


def test_training_mode_is_restored_and_bad_layer_raises():
    qf = _qformer().train()
    cross_attention(qf, torch.randn(1, 10, qf.cfg.encoder_width))
    assert qf.training
    with pytest.raises(ValueError, match="layer 1 has no cross-attention"):
        cross_attention(qf, torch.randn(1, 10, qf.cfg.encoder_width), layer=1)


def test_tokens_to_grid_drops_prefix_and_is_row_major():
    probs = torch.zeros(1, 2, 1 + 12)
    probs[0, 0, 0] = 0.5  # CLS
    probs[0, 0, 1 + 1 * 4 + 3] = 0.5  # row 1, column 3 of a 3 x 4 grid
    probs[0, 1, 1 + 2 * 4 + 0] = 1.0  # row 2, column 0
    out = tokens_to_grid(probs, prefix=1, grid_hw=(3, 4))
    assert out["maps"].shape == (1, 2, 3, 4)
    assert out["maps"][0, 0, 1, 3] == 0.5 and out["maps"][0, 1, 2, 0] == 1.0 and out["maps"].sum() == 1.5
    torch.testing.assert_close(out["prefix_mass"], torch.tensor([[0.5, 0.0]]))
    with pytest.raises(ValueError, match="not a square grid"):
        tokens_to_grid(probs, prefix=0)
    with pytest.raises(ValueError, match="grid 3x3"):
        tokens_to_grid(probs, prefix=1, grid_hw=(3, 3))


def test_query_attention_maps_on_a_tiny_vit_blip2():
    model = Blip2(Blip2Config(stage="pretrain", vision=VisionConfig.from_name("tiny-vit"),
                              qformer=QFormerConfig.from_name("tiny"), embed_dim=16)).eval()
    images = torch.randn(2, 3, 64, 64)
    embeds = model.encode_image(images)  # (2, 1 + 16, 64): CLS + 4 x 4 patches
    maps = query_attention_maps(model, embeds)
    assert maps.shape == (2, model.cfg.qformer.num_query_tokens, 4, 4)
    probs = cross_attention(model.qformer, embeds)["probs"]
    # the CLS column is dropped, the 16 patch columns are kept in order
    assert torch.allclose(torch.from_numpy(maps).flatten(2), probs[..., 1:])
