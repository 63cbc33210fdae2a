"""Writing our LLaMA as a Hugging Face folder (config.json + model.safetensors).

The embedded default trains its small LLM and then saves it in the format real checkpoints come in,
so that it is loaded back through `models.convert.llama.load_hf_llama` exactly like Vicuna-7B.
Our parameter names are Hugging Face's, so the export is the inverse of that converter's map.

A stage trained with LoRA (models/lora.py) exports its LLM with the adapters folded in
(`save_merged_llama`), a plain LLaMA folder any LLaMA loader reads:

    python -c "from expvl.training.runs import open_run; from expvl.models.convert.hf_export import \
    save_merged_llama; save_merged_llama(open_run('runs/x').stage_model('instruct'), 'runs/x/llm_merged')"
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from expvl.models.convert.llama import hf_llama_key_map
from expvl.models.llm import LLaMA
from expvl.models.lora import adapter_names, merge_lora


def hf_config_dict(model: LLaMA) -> dict:
    """A LlamaForCausalLM config.json for `model`; a config a LLaMA's config.json cannot state (Qwen's
    bias split or q/k norms, a sliding window) is refused, naming the field, rather than written wrong."""
    c = model.config
    unstated = [name for name, off in (("qkv_bias != o_bias", c.qkv_bias == c.o_bias), ("qk_norm", not c.qk_norm),
                                       ("sliding_window", c.sliding_window is None)) if not off]
    if unstated:
        raise ValueError(f"a LLaMA config.json cannot state {', '.join(unstated)}; only LLaMA configs are exported")
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
         "vocab_size": c.vocab_size, "hidden_size": c.dim, "num_hidden_layers": c.n_layers,
         "num_attention_heads": c.n_heads, "num_key_value_heads": c.kv_heads,
         "intermediate_size": c.hidden_dim, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
         "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings,
         "attention_bias": c.qkv_bias, "head_dim": c.head_size, "torch_dtype": "float32"}
    if c.rope_scaling is not None:
        d["rope_scaling"] = {"rope_type": c.rope_scaling.rope_type, "factor": c.rope_scaling.factor,
                             "low_freq_factor": c.rope_scaling.low_freq_factor,
                             "high_freq_factor": c.rope_scaling.high_freq_factor,
                             "original_max_position_embeddings": c.rope_scaling.original_max_position_embeddings}
    return d


def save_hf_llama(model: LLaMA, folder: str | Path) -> Path:
    if adapter_names(model):  # their base weights sit under other names (q_proj.base_layer.weight)
        raise ValueError(f"the LLM has LoRA adapters ({adapter_names(model)[:2]}, ...): export it with "
                         "save_merged_llama, which folds them in first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ours = model.state_dict()
    tensors = {hf: ours[mine].detach().contiguous().cpu() for mine, hf in hf_llama_key_map(model.config).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config_dict(model), indent=1))
    return folder


def save_merged_llama(model: nn.Module, folder: str | Path, *, in_place: bool = False) -> Path:
    """The LLM of `model` (a stage's Blip2, or a LLaMA itself) with its LoRA adapters merged into the weights
    (models/lora.py `merge_lora`), saved as a Hugging Face folder. A copy is merged unless `in_place` (which
    spares the memory of a second LLM and leaves `model` computing the same with plain layers)."""
    llm = model.llm if hasattr(model, "llm") else model
    if not isinstance(llm, LLaMA):
        raise TypeError(f"save_merged_llama exports a LLaMA decoder, got {type(llm).__name__}")
    return save_hf_llama(merge_lora(llm if in_place else copy.deepcopy(llm)), folder)
