"""The three BLIP-2-style stages, declared once: `STAGES`, the table every consumer reads.

    stage 1  pretrain   Q-Former representation learning: ITC + ITM + ITG, frozen image encoder
                        (BLIP-2 section 3.2)
    stage 2  caption    captioning through the frozen LLM (BLIP-2 section 3.3; Exp-BLIP's AU-BLIP,
                        Emot-BLIP and Exp-BLIP are this stage on different captions)
    stage 3  instruct   instruction-aware VQA: the question enters the Q-Former and the LLM
                        (InstructBLIP; Exp-VQA's Q1 / Q2 / Q3 questions)

        records --samples--> samples --collate--> batch --module--> loss
                                                      ^
        checkpoints of earlier stages --init_from-----+  (the parts each `hands_on`)

A row says what the stage is called in a model config and a checkpoint (`name`, the values of
`Blip2Config.stage`), where it writes in a run folder (`folder`), which `RunConfig` section holds its
settings (`config_key`), which parameters it trains (`trains`; everything else is frozen, and
checkpoints hold exactly these, plus the LoRA adapters its `lora` setting adds to the frozen LLM:
`trainable`), what its checkpoint gives a later stage (`hands_on`; adapters never: each stage's are
its own, and a later one with LoRA starts fresh ones on the original LLM), which earlier
stages start it in the embedded default (`init_from`), and how it builds its samples, its batches
and its LightningModule. The embedded default (pipeline.py), one recipe stage (single_stage.py) and
the run loader (runs.py) all read this table; tests/training/test_stages.py checks it against the
schema and the model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import lightning as L

from expvl.configs.schema import RunConfig, StageConfig
from expvl.datamodules.collate import (
    CaptionCollate,
    InstructCollate,
    PretrainCollate,
    TextConfig,
    caption_samples,
    vqa_samples,
)
from expvl.datamodules.datamodule import DataConfig, StageDataModule
from expvl.datamodules.features import FeatureStore
from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.convert.weights import CheckpointError
from expvl.models.llm import LLaMA
from expvl.models.lora import LORA_MARKER, apply_lora, is_adapter
from expvl.models.vision import VisionEncoder
from expvl.training.checkpoints import finish_checkpoint, init_from_checkpoints
from expvl.training.lit_base import Trainable
from expvl.training.lit_blip2 import LitLanguage, LitPretrain
from expvl.training.run_folder import Step, trainer, trainer_loss


def _pretrain_collate(tokenizers: dict, text: TextConfig, features: FeatureStore | None):
    return PretrainCollate(tokenizers["qformer"], text, features)


def _caption_collate(tokenizers: dict, text: TextConfig, features: FeatureStore | None):
    return CaptionCollate(tokenizers["llm"], text, features)


def _instruct_collate(tokenizers: dict, text: TextConfig, features: FeatureStore | None):
    return InstructCollate(tokenizers["qformer"], tokenizers["llm"], text, features)


def _pretrain_module(model: Blip2, st: StageConfig, tokenizers: dict) -> L.LightningModule:
    qtok = tokenizers["qformer"]
    return LitPretrain(model, trainable=trainable(model), optim=st.optim, total_steps=st.max_steps,
                       dec_token_id=qtok.dec_id, pad_token_id=qtok.pad_id, label_positives=st.label_positives)


def _language_module(model: Blip2, st: StageConfig, tokenizers: dict) -> L.LightningModule:
    return LitLanguage(model, trainable=trainable(model), optim=st.optim, total_steps=st.max_steps,
                       loss_norm=st.loss_norm)


@dataclass(frozen=True)
class Stage:
    name: str  # Blip2Config.stage and a checkpoint's "stage" entry
    folder: str  # the step folder in a run: <run_dir>/<folder>/final.ckpt
    config_key: str  # the RunConfig field with this stage's StageConfig
    trains: tuple[str, ...]  # parameter prefixes that train ("vision." is added when the encoder is unfrozen,
    #   and the LoRA adapters of the stage's `lora` setting train too: `trainable`)
    hands_on: tuple[str, ...]  # what a later stage takes from this stage's checkpoint
    init_from: tuple[str, ...]  # embedded default: earlier stages whose checkpoints start this one, in order
    samples: Callable[[StageConfig], Callable]  # record -> the samples it trains on
    collate: Callable[[dict, TextConfig, FeatureStore | None], Any]  # (tokenizers, text, features) -> collate
    module: Callable[[Blip2, StageConfig, dict], L.LightningModule]  # (model, settings, tokenizers) -> module
    needs_llm: bool = True

    def settings(self, cfg: RunConfig) -> StageConfig:
        return getattr(cfg, self.config_key)


STAGES: dict[str, Stage] = {s.name: s for s in (
    # Stage 1 has no LLM, so nothing hands on an llm_proj: a stage-2/3 model started from it keeps a fresh
    # projection, as BLIP-2's second stage starts. Its ITC/ITM heads and the Q-Former's LM head stay behind.
    Stage("pretrain", "stage1", "stage1",
          trains=("ln_vision.", "qformer.", "vision_proj.", "text_proj.", "itm_head.", "temp"),
          hands_on=("ln_vision.", "qformer."), init_from=(),
          samples=lambda st: caption_samples(st.captions), collate=_pretrain_collate, module=_pretrain_module,
          needs_llm=False),
    Stage("caption", "stage2", "stage2", trains=("ln_vision.", "qformer.", "llm_proj."),
          hands_on=("ln_vision.", "qformer.", "llm_proj."), init_from=("pretrain",),
          samples=lambda st: caption_samples(st.captions), collate=_caption_collate, module=_language_module),
    # InstructBLIP-style: the whole Q-Former from stage 1 (its text side included), then what stage 2
    # trained on top (the query side, ln_vision, llm_proj)
    Stage("instruct", "stage3", "stage3", trains=("ln_vision.", "qformer.", "llm_proj."),
          hands_on=("ln_vision.", "qformer.", "llm_proj."), init_from=("pretrain", "caption"),
          samples=lambda st: vqa_samples(st.vqa_types), collate=_instruct_collate, module=_language_module),
)}


def trainable(model: Blip2) -> Trainable:
    """What `model`'s stage trains: the prefixes of its row, plus the encoder when its config unfreezes it
    (Exp-BLIP's second step, Exp-VQA's non-frozen variant), plus whatever LoRA adapters the model carries
    (`apply_stage_lora`; wherever they sit, inside the frozen LLM or encoder)."""
    extra = ("vision.",) if not model.vision.config.freeze else ()
    return Trainable(STAGES[model.cfg.stage].trains + extra, markers=(LORA_MARKER,))


def stage_config_keys() -> list[str]:
    """The RunConfig fields that hold a StageConfig (what the table must cover)."""
    return [f.name for f in fields(RunConfig) if f.type in (StageConfig, "StageConfig")]


# ---- building and running one stage -----------------------------------------------------------

def blip2_config(cfg: RunConfig, stage: str, tokenizers: dict, llm: LLaMA | None) -> Blip2Config:
    """The model config of `stage` on these tokenizers and LLM (the Q-Former's vocabulary is its tokenizer's)."""
    qcfg = replace(cfg.model.qformer, vocab_size=tokenizers["qformer"].vocab_size,
                   pad_token_id=tokenizers["qformer"].pad_id)
    return Blip2Config(stage=stage, vision=cfg.model.vision, qformer=qcfg,
                       llm=None if llm is None else llm.config, embed_dim=cfg.model.embed_dim,
                       image_position=cfg.model.image_position)


def apply_stage_lora(model: Blip2, cfg: RunConfig) -> list[str]:
    """The LoRA adapters `model`'s stage asks for (`<stage>.lora`, models/lora.py) added to its LLM (and encoder),
    in place; none at rank 0. Called by both model builders (`build_stage_model`, single_stage.py
    `build_stage_parts`) after the decoder is built and before any checkpoint loads, so that training, the
    run loader and the Python API see the same model. Returns the adapter parameter names."""
    return apply_lora(model, STAGES[model.cfg.stage].settings(cfg).lora)


def build_stage_model(cfg: RunConfig, stage: str, tokenizers: dict, encoder: VisionEncoder,
                      llm: LLaMA | None, inits: list[tuple[Path, tuple[str, ...]]] = ()) -> Blip2:
    """The stage's Blip2 around the given encoder and LLM, with its LoRA adapters, started from `inits`
    (checkpoint, prefixes).

    The encoder and LLM handed in are shared by the stages of a run (pipeline.py, runs.py), so a stage with
    LoRA adapts copies of them: adapters injected in place would reach the other stages' models too.
    """
    lora = STAGES[stage].settings(cfg).lora
    if lora.enabled:
        llm = copy.deepcopy(llm)
        if lora.vision_target_modules:
            encoder = copy.deepcopy(encoder)
    model = Blip2(blip2_config(cfg, stage, tokenizers, llm), vision=encoder, llm=llm)
    apply_stage_lora(model, cfg)
    if inits:
        init_from_checkpoints(model, inits)
    return model


def _hands_on(ck: dict, tensors: dict, path) -> tuple[str, ...]:
    stage = ck.get("stage")
    if stage not in STAGES:
        raise CheckpointError(f"{path}: 'stage' entry is {stage!r}, not one of {sorted(STAGES)}"
                              " (init_checkpoints takes the final.ckpt a stage run writes)")
    # keyed by the writing stage rather than by what the file happens to contain, so a stage-2 checkpoint
    # that lost its llm_proj fails instead of silently leaving the projection random. A stage that
    # fine-tuned the encoder (Exp-BLIP step 2: vision.freeze=false) saved it, as checkpoints hold exactly
    # what trained: hand it on too, or the next stage starts from the original weights. Encoder adapters
    # (LoRA) are that stage's own and say nothing about the encoder's weights
    vision = ("vision.",) if any(k.startswith("vision.") and not is_adapter(k) for k in tensors) else ()
    return STAGES[stage].hands_on + vision


def init_from_stage_checkpoints(model: Blip2, paths) -> list[str]:
    """`init_from_checkpoints` with each checkpoint's prefixes read off the stage that wrote it (its
    "stage" entry names a row of the table, whose `hands_on` says what it gives a later stage)."""
    return init_from_checkpoints(model, [(path, _hands_on) for path in paths])


def stage_data_config(cfg: RunConfig, st: StageConfig, data_root: Path | str) -> DataConfig:
    """cfg.data on `data_root` with the stage's batch size and length grouping."""
    return replace(cfg.data, root=str(data_root), batch_size=st.batch_size,
                   stream=replace(cfg.data.stream, group_by_length=st.group_by_length))


def stage_data(cfg: RunConfig, stage: Stage, data_root: Path | str, tokenizers: dict, *,
               features: FeatureStore | None = None, encoder: VisionEncoder | None = None) -> StageDataModule:
    """The stage's datamodule on `data_root`: cached encoder `features`, or images through `encoder`'s
    transforms."""
    st = stage.settings(cfg)
    data_cfg = stage_data_config(cfg, st, data_root)
    images = {} if features is not None else {"transform": encoder.train_transform,
                                              "val_transform": encoder.eval_transform}
    return StageDataModule(data_cfg, expand=stage.samples(st), collate=stage.collate(tokenizers, cfg.text, features),
                           **images)


def stage_trainer(cfg: RunConfig, stage: Stage) -> L.Trainer:
    """The Trainer of one stage in `run_dir/<folder>/`. Built before anything is written: its
    `is_global_zero` (known from the launcher's environment before any process group exists) says
    which DDP process writes the run folder."""
    st = stage.settings(cfg)
    return trainer(cfg, Path(cfg.run_dir) / stage.folder, max_steps=st.max_steps, grad_clip=st.optim.grad_clip)


def run_stage(cfg: RunConfig, stage: Stage, *, model: Blip2, data: StageDataModule, tokenizers: dict,
              inputs: dict, tr: L.Trainer | None = None) -> Path:
    """Fit one stage (resuming from its last checkpoint) and return its trimmed final checkpoint.

    Under DDP every rank calls this (with its `stage_trainer`, or one is built here); global rank 0
    alone writes, the others return once final.ckpt is complete.
    """
    tr = stage_trainer(cfg, stage) if tr is None else tr
    step = Step(Path(cfg.run_dir), stage.folder, inputs, writer=tr.is_global_zero)
    final = step.dir / "final.ckpt"
    if step.done:
        return final
    L.seed_everything(cfg.seed, workers=True)
    lit = stage.module(model, stage.settings(cfg), tokenizers)
    tr.fit(lit, datamodule=data, ckpt_path=step.resume_path(), weights_only=True)
    finish_checkpoint(tr, final, cfg, stage=stage.name)
    if tr.is_global_zero:
        step.finish(final_loss=trainer_loss(lit), trainable=lit.counts["trainable"], total=lit.counts["total"])
    return final
