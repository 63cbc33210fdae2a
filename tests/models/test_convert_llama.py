"""models/convert/llama.py: HF folders in every layout load with identical logits; every broken
folder raises CheckpointError naming the file or key; full-size maps check out on the meta device."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from expvl.models.convert.llama import hf_llama_key_map, load_hf_llama
from expvl.models.convert.weights import CheckpointError, load_mapped
from expvl.models.llm import LLaMA, LLMConfig
from tests.helpers.llm import hf_tiny, left_padded, single_thread  # noqa: F401  (autouse fixture)

transformers = pytest.importorskip("transformers")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids)["logits"].float()


def test_sharded_safetensors(tmp_path):
    hf, single = hf_tiny(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path / "b", max_shard_size="20KB")
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    ids, _ = left_padded(pads=(0, 0, 0))
    torch.testing.assert_close(logits(load_hf_llama(tmp_path / "b"), ids), logits(single, ids))


def test_pytorch_bin_with_old_rotary_buffers(tmp_path):
    hf, ours = hf_tiny(tmp_path / "a")
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    for i in range(hf.config.num_hidden_layers):  # what transformers < 4.31 used to save
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save(sd, folder / "pytorch_model.bin")
    ids, _ = left_padded(pads=(0, 0, 0))
    torch.testing.assert_close(logits(load_hf_llama(folder), ids), logits(ours, ids))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype(tmp_path, dtype):
    _, ours = hf_tiny(tmp_path)
    low = load_hf_llama(tmp_path, dtype=dtype)
    assert {p.dtype for p in low.parameters()} == {dtype}
    ids, _ = left_padded(pads=(0, 0, 0))
    torch.testing.assert_close(logits(low, ids), logits(ours, ids), atol=0.15, rtol=0.05)


def test_missing_config(tmp_path):
    hf_tiny(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_llama(tmp_path)


def test_no_weights(tmp_path):
    hf_tiny(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_llama(tmp_path)


def test_missing_shard(tmp_path):
    hf, _ = hf_tiny(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path / "b", max_shard_size="20KB")
    shard = sorted((tmp_path / "b").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_hf_llama(tmp_path / "b")


def test_truncated_safetensors(tmp_path):
    hf_tiny(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_llama(tmp_path)


def test_wrong_shape_missing_and_unexpected_keys(tmp_path):
    hf_tiny(tmp_path)
    f = tmp_path / "model.safetensors"
    good = load_file(f)
    key = "model.layers.1.mlp.up_proj.weight"
    save_file({**good, key: torch.zeros(5, 5)}, f)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + r" has shape \(5, 5\)"):
        load_hf_llama(tmp_path)
    save_file({k: v for k, v in good.items() if k != key}, f)
    with pytest.raises(CheckpointError, match=f"missing key.*{key}"):
        load_hf_llama(tmp_path)
    save_file({**good, "model.layers.9.mlp.up_proj.weight": torch.zeros(1)}, f)
    with pytest.raises(CheckpointError, match="unexpected key.*layers.9"):
        load_hf_llama(tmp_path)


def test_unsupported_config(tmp_path):
    hf_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json.*yarn"):
        load_hf_llama(tmp_path)


@pytest.mark.parametrize("preset,hf_kw", [
    ("llama2-7b", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                       max_position_embeddings=4096)),
    ("llama3-8b", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=8192)),
])
def test_full_size_map_on_meta(preset, hf_kw):
    """Real shapes: HF's meta-device state dict fills our meta-device model key for key."""
    hf_cfg = transformers.LlamaConfig(**hf_kw)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_sd = transformers.LlamaForCausalLM(hf_cfg).state_dict()
        ours = LLaMA(LLMConfig.from_name(preset))
    ours_from_json = LLMConfig.from_hf_json(hf_cfg.to_dict())
    assert ours_from_json == ours.config
    key_map = hf_llama_key_map(ours.config)
    assert set(key_map) == set(ours.state_dict()) and set(key_map.values()) == set(hf_sd)
    load_mapped(ours, hf_sd, key_map, what=preset)  # raises on any missing / extra / mis-shaped key
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(t.numel() for t in hf_sd.values())
    assert abs(n / 1e9 - {"llama2-7b": 6.74, "llama3-8b": 8.03}[preset]) < 0.01
