"""`train.py mode=stage`: one stage of a real recipe, every pretrained part read from local files.

The embedded default (pipeline.py) builds its own parts; here the user names them in
`pretrained.*` (configs/schema.py `PretrainedConfig`): a Hugging Face LLaMA folder and its
tokenizer, a bert-base-uncased vocab.txt for the Q-Former, optionally a LAVIS BLIP-2 / InstructBLIP
checkpoint or a transformers Blip2 / InstructBlip folder, and our own stage checkpoints. The stage
(a row of the stage table, stages.py) then trains through the same `run_stage` (resumable, trimmed
final checkpoint) on the records under `data.root`. The run loader (runs.py) rebuilds the same model
with `build_stage_parts` + `init_stage_weights` to evaluate it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from expvl.configs import save_config
from expvl.configs.schema import PretrainedConfig, RunConfig
from expvl.models.blip2 import Blip2
from expvl.models.convert import load_hf_llm
from expvl.models.convert.blip2_parts import copy_parts, load_qformer_checkpoint
from expvl.models.llm import LLaMA, fit_vocab
from expvl.models.tokenizer import QFormerTokenizer, llm_tokenizer
from expvl.models.vision import VisionEncoder
from expvl.training.stages import (
    STAGES,
    apply_stage_lora,
    blip2_config,
    init_from_stage_checkpoints,
    run_stage,
    stage_data,
    stage_trainer,
)

log = logging.getLogger("single_stage")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StageParts:
    """What `train.py mode=stage` builds before it trains: tokenizers, frozen LLM, encoder, model."""
    tokenizers: dict  # "qformer", and "llm" for stages 2 and 3
    encoder: VisionEncoder  # model.vision: cfg.model.vision with its own `pretrained` weights
    llm: LLaMA | None  # None for stage 1; its vocabulary grown to its tokenizer's when that is larger (fit_vocab), with the
    #   stage's LoRA adapters when `<stage>.lora` asks for them
    model: Blip2  # the stage's model, its own parts freshly initialised (no lavis / init checkpoints yet)


def build_stage_parts(cfg: RunConfig) -> StageParts:
    """The stage's model as training builds it, from the local files in `cfg.pretrained` and
    `cfg.model.vision`; the run loader (runs.py) builds the same and loads the stage's final.ckpt."""
    p = cfg.pretrained
    toks = {"qformer": QFormerTokenizer.from_bert_vocab(p.qformer_vocab)}
    llm = None
    if STAGES[cfg.stage].needs_llm:
        toks["llm"] = llm_tokenizer(p.llm_tokenizer, convention=p.llm_convention)
        llm = fit_vocab(load_hf_llm(p.llm, dtype=DTYPES[p.llm_dtype]), toks["llm"].vocab_size).eval()
    encoder = VisionEncoder(cfg.model.vision)
    model = Blip2(blip2_config(cfg, cfg.stage, toks, llm), vision=encoder, llm=llm)
    # the LLM and encoder were loaded for this model alone: its adapters go into them in place, before
    # init_stage_weights / the run loader's final.ckpt read anything
    apply_stage_lora(model, cfg)
    return StageParts(tokenizers=toks, encoder=encoder, llm=llm, model=model)


def init_stage_weights(model: Blip2, p: PretrainedConfig) -> None:
    """The starting weights a recipe names: a LAVIS or a transformers checkpoint (its Q-Former strictly, and
    the parts around it the stage has a place for), then our own stage checkpoints, applied in order."""
    for path, source in ((p.lavis_checkpoint, "lavis"), (p.hf_checkpoint, "transformers")):
        if path:
            copy_parts(model, load_qformer_checkpoint(model.qformer, path, source), path)
    if p.init_checkpoints:
        # each file gives what its own stage trained: a stage-1 checkpoint the Q-Former and
        # ln_vision, leaving a stage-2/3 model's llm_proj fresh
        init_from_stage_checkpoints(model, p.init_checkpoints)


def run_single_stage(cfg: RunConfig) -> dict:
    """One stage of a real recipe: tokenizers, encoder, LLM and initial weights from local files.

    Under DDP every rank runs all of this; only global rank 0 writes into the run folder (run_stage).
    """
    run_dir = Path(cfg.run_dir)
    stage = STAGES[cfg.stage]
    tr = stage_trainer(cfg, stage)
    if tr.is_global_zero:
        save_config(cfg, run_dir / "config.yaml")
    parts = build_stage_parts(cfg)
    init_stage_weights(parts.model, cfg.pretrained)
    data = stage_data(cfg, stage, cfg.data.root, parts.tokenizers, encoder=parts.encoder)
    final = run_stage(cfg, stage, model=parts.model, data=data, tokenizers=parts.tokenizers,
                      inputs={"config": asdict(cfg)}, tr=tr)
    return {"run_dir": str(run_dir), "checkpoint": str(final)}
