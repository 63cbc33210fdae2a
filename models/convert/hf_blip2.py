"""Hugging Face Blip2 / InstructBlip Q-Former state dicts -> our Q-Former.

Source key names are those of transformers 5.23 (`models/blip_2/modeling_blip_2.py`,
`models/instructblip/modeling_instructblip.py`), at the top level of the full models
(`Blip2ForConditionalGeneration`, `Blip2ForImageTextRetrieval`, `InstructBlipForConditionalGeneration`):
`query_tokens`, `qformer.*`, and for Blip2 with text also the top-level `embeddings.*`. A bare
`Blip2QFormerModel` state dict is the same with "qformer." prepended.

They differ from LAVIS (and us) in:
- attention projections: `attention.attention.{query,key,value}` vs `attention.self.*` (same for
  `crossattention`);
- the embedding LayerNorm: Blip2 has it as `qformer.layernorm` (word/position embeddings live in
  the separate top-level `embeddings` of the retrieval / text models); InstructBlip has
  `qformer.embeddings.{word_embeddings, position_embeddings, layernorm}`;
- no LM head at all: build our Q-Former with `lm_head=False` for these.

The two families get one explicit map each. Heads and projections around the Q-Former
(`language_projection`, `vision_projection`, `text_projection`, `itm_head`) are returned for the
composition; `vision_model.*` and `language_model.*` are ignored (they load elsewhere).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from expvl.models.convert.eva import HF_LN_VISION
from expvl.models.convert.weights import CheckpointError, load_mapped, read_weights
from expvl.models.qformer import QFormer, QFormerConfig

COMPOSITION_PARTS = ("language_projection", "vision_projection", "text_projection", "itm_head")
IGNORED_PARTS = ("vision_model", "language_model")

# ours (inside bert.encoder.layer.{i}.) -> transformers (inside qformer.encoder.layer.{i}.)
_SELF_ATTENTION = {
    "attention.self.query": "attention.attention.query",
    "attention.self.key": "attention.attention.key",
    "attention.self.value": "attention.attention.value",
    "attention.output.dense": "attention.output.dense",
    "attention.output.LayerNorm": "attention.output.LayerNorm",
}
_CROSS_ATTENTION = {
    "crossattention.self.query": "crossattention.attention.query",
    "crossattention.self.key": "crossattention.attention.key",
    "crossattention.self.value": "crossattention.attention.value",
    "crossattention.output.dense": "crossattention.output.dense",
    "crossattention.output.LayerNorm": "crossattention.output.LayerNorm",
}
_TEXT_FFN = {
    "intermediate.dense": "intermediate.dense",
    "output.dense": "output.dense",
    "output.LayerNorm": "output.LayerNorm",
}
_QUERY_FFN = {
    "intermediate_query.dense": "intermediate_query.dense",
    "output_query.dense": "output_query.dense",
    "output_query.LayerNorm": "output_query.LayerNorm",
}


def _weights_and_biases(modules: Mapping[str, str]) -> dict[str, str]:
    """Every module listed here is a Linear or LayerNorm: one weight and one bias each."""
    return {f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in modules.items() for p in ("weight", "bias")}


def _layer_map(cfg: QFormerConfig) -> dict[str, str]:
    key_map = {}
    for i in range(cfg.num_layers):
        modules = dict(_SELF_ATTENTION)
        if i % cfg.cross_attention_freq == 0:  # same rule in transformers (`cross_attention_frequency`)
            modules |= _CROSS_ATTENTION
        if cfg.text_input:
            modules |= _TEXT_FFN
        modules |= _QUERY_FFN
        for ours, theirs in _weights_and_biases(modules).items():
            key_map[f"bert.encoder.layer.{i}.{ours}"] = f"qformer.encoder.layer.{i}.{theirs}"
    return key_map


def blip2_key_map(cfg: QFormerConfig) -> dict[str, str]:
    """{our key: Blip2 key}; text embeddings come from the top-level `embeddings` module."""
    key_map = {"query_tokens": "query_tokens",
               "bert.embeddings.LayerNorm.weight": "qformer.layernorm.weight",
               "bert.embeddings.LayerNorm.bias": "qformer.layernorm.bias"}
    if cfg.text_input:
        key_map["bert.embeddings.word_embeddings.weight"] = "embeddings.word_embeddings.weight"
        key_map["bert.embeddings.position_embeddings.weight"] = "embeddings.position_embeddings.weight"
    return key_map | _layer_map(cfg)


def instructblip_key_map(cfg: QFormerConfig) -> dict[str, str]:
    """{our key: InstructBlip key}; InstructBlip's Q-Former always has the text parts."""
    key_map = {"query_tokens": "query_tokens",
               "bert.embeddings.LayerNorm.weight": "qformer.embeddings.layernorm.weight",
               "bert.embeddings.LayerNorm.bias": "qformer.embeddings.layernorm.bias",
               "bert.embeddings.word_embeddings.weight": "qformer.embeddings.word_embeddings.weight",
               "bert.embeddings.position_embeddings.weight":
                   "qformer.embeddings.position_embeddings.weight"}
    return key_map | _layer_map(cfg)


def _load(model: QFormer, state_dict: Mapping[str, torch.Tensor], key_map: dict[str, str],
          what: str) -> dict[str, torch.Tensor]:
    if model.cfg.lm_head:
        raise CheckpointError(f"{what} has no Q-Former LM head; build the Q-Former with lm_head=False")
    top = {k: k.split(".", 1)[0] for k in state_dict}
    parts = {k: v for k, v in state_dict.items() if top[k] in COMPOSITION_PARTS}
    ignore = [k for k in state_dict if top[k] in IGNORED_PARTS] + list(parts)
    load_mapped(model, state_dict, key_map, ignore=ignore, what=what)
    return parts


def load_hf_blip2_qformer(model: QFormer, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load a transformers Blip2 state dict's Q-Former into `model`; return the composition parts.

    The model needs text_input=True only for checkpoints with text (`use_qformer_text_input`,
    e.g. Blip2ForImageTextRetrieval); the captioning checkpoints are query-only.
    """
    return _load(model, state_dict, blip2_key_map(model.cfg), "Blip2 state dict")


def load_hf_instructblip_qformer(model: QFormer, state_dict: Mapping[str, torch.Tensor]
                                 ) -> dict[str, torch.Tensor]:
    """Load a transformers InstructBlip state dict's Q-Former into `model` (text_input=True)."""
    if not model.cfg.text_input:
        raise CheckpointError("InstructBlip's Q-Former reads the instruction: build it with text_input=True")
    return _load(model, state_dict, instructblip_key_map(model.cfg), "InstructBlip state dict")


def load_hf_qformer_file(model: QFormer, path) -> dict[str, torch.Tensor]:
    """The Q-Former and query tokens of a transformers Blip2 / InstructBlip folder or file, the family
    told by its keys; returns the composition parts, `vision_model.post_layernorm.*` (ln_vision)
    included. The ViT and the LLM beside it are not read."""
    skip = tuple(f"{part}." for part in IGNORED_PARTS)
    state = read_weights(path, keep=lambda k: not k.startswith(skip) or k.startswith(HF_LN_VISION))
    if "qformer.embeddings.layernorm.weight" in state:
        parts = load_hf_instructblip_qformer(model, state)
    elif "qformer.layernorm.weight" in state:
        parts = load_hf_blip2_qformer(model, state)
    else:
        raise CheckpointError(f"{path}: neither a transformers Blip2 (qformer.layernorm.*) nor an "
                              "InstructBlip (qformer.embeddings.layernorm.*) checkpoint")
    return parts | {k: v for k, v in state.items() if k.startswith(HF_LN_VISION)}


# a transformers folder's model_type -> the stage of ours it is: InstructBlip's Q-Former reads the
# instruction (stage 3), Blip2's is query-only (stage 2)
HF_STAGES = {"instructblip": "instruct", "blip-2": "caption"}


def qformer_config_from_hf(config: Mapping) -> QFormerConfig:
    """Our QFormerConfig for the Q-Former of a transformers Blip2 / InstructBlip config.json (as a dict)."""
    q = config["qformer_config"]
    if q.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"qformer_config.hidden_act {q['hidden_act']!r}: only BERT's 'gelu' is implemented")
    return QFormerConfig(vocab_size=q.get("vocab_size", 30522), hidden_size=q["hidden_size"],
                         num_layers=q["num_hidden_layers"], num_heads=q["num_attention_heads"],
                         intermediate_size=q["intermediate_size"], layer_norm_eps=q.get("layer_norm_eps", 1e-12),
                         max_position_embeddings=q.get("max_position_embeddings", 512),
                         encoder_width=q.get("encoder_hidden_size", 1408),
                         cross_attention_freq=q.get("cross_attention_frequency", 2),
                         num_query_tokens=config.get("num_query_tokens", 32), pad_token_id=q.get("pad_token_id", 0),
                         hidden_dropout=0.0, attention_dropout=0.0, lm_head=False)
