"""Writing our LLaMA as a Hugging Face folder (config.json + model.safetensors).

The embedded default trains its small LLM and then saves it in the format real checkpoints come in,
so that it is loaded back through `models.convert.llama.load_hf_llama` exactly like Vicuna-7B.
Our parameter names are Hugging Face's, so the export is the inverse of that converter's map.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from expvl.models.convert.llama import hf_llama_key_map
from expvl.models.llm import LLaMA


def hf_config_dict(model: LLaMA) -> dict:
    c = model.config
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
         "vocab_size": c.vocab_size, "hidden_size": c.dim, "num_hidden_layers": c.n_layers,
         "num_attention_heads": c.n_heads, "num_key_value_heads": c.kv_heads,
         "intermediate_size": c.hidden_dim, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
         "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings,
         "attention_bias": c.attention_bias, "head_dim": c.head_size, "torch_dtype": "float32"}
    if c.rope_scaling is not None:
        d["rope_scaling"] = {"rope_type": c.rope_scaling.rope_type, "factor": c.rope_scaling.factor,
                             "low_freq_factor": c.rope_scaling.low_freq_factor,
                             "high_freq_factor": c.rope_scaling.high_freq_factor,
                             "original_max_position_embeddings": c.rope_scaling.original_max_position_embeddings}
    return d


def save_hf_llama(model: LLaMA, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ours = model.state_dict()
    tensors = {hf: ours[mine].detach().contiguous().cpu() for mine, hf in hf_llama_key_map(model.config).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config_dict(model), indent=1))
    return folder
