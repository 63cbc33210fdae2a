"""The embedded default, step by step: data -> "pretrained" parts -> stages 1-3 -> evaluation.

`python train.py` with no arguments runs `run_pipeline(load_config(RunConfig, ["default"]))`.
Every step writes its output under `run_dir/<step>/` with a `done.json` naming the hash of what it
was built from; a rerun skips finished steps, and a step whose inputs changed refuses to mix
(delete its folder). A killed stage resumes from its last checkpoint (Lightning `ckpt_path`).

Steps (DESIGN.md "The embedded default"):
1. data        SynthFACS faces + rule-based (or LLM) captions + VQA pairs (`python -m synthesis`)
2. tokenizers  SentencePiece for the LLM and for the Q-Former, trained on the synthesized text
3. llm         a small LLaMA trained as a causal LM on that text, saved as a Hugging Face folder and
               loaded back through models/convert/llama.py exactly like a real checkpoint
4. encoder     the tiny conv tower trained with AU/emotion heads, then frozen
5. features    frozen-encoder tokens cached once for every split
6. stage1      Q-Former ITC + ITM + ITG
7. stage2      captioning through the frozen LLM (Exp-BLIP: fused captions)
8. stage3      instruction-aware VQA (Exp-VQA: Q1/Q2/Q3/emotion questions)
9. eval        AU F1 from Q3 yes/no scoring, emotion accuracy, report (eval.py)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torchvision.transforms import RandomResizedCrop

from configs import save_config
from configs.schema import RunConfig, StageConfig
from datamodules.collate import CaptionCollate, InstructCollate, PretrainCollate, caption_samples, vqa_samples
from datamodules.datamodule import DataConfig, StageDataModule
from datamodules.features import FeatureStore
from datamodules.images import random_resized_crop
from datamodules.labels import LabelCollate
from models.blip2 import Blip2, Blip2Config
from models.convert.hf_export import save_hf_llama
from models.convert.llama import load_hf_llama
from models.convert.stages import init_from_checkpoints
from models.lit_blip2 import LitLanguage, LitPretrain
from models.lit_bootstrap import LitCausalLM, LitEncoderPretrain
from models.llm import LLaMA
from models.tokenizer import QFormerTokenizer, SPTokenizer
from models.vision import VisionEncoder
from run_folder import Step, built_from, data_fingerprint, trainer
from synthesis.facs import EMOTIONS
from synthesis.shards import read_split_records

log = logging.getLogger("pipeline")
STAGE_DIRS = {"pretrain": "stage1", "caption": "stage2", "instruct": "stage3"}  # a run folder's stage steps


# ---- steps 1-5: data and the "pretrained" parts --------------------------------------------------------

def step_data(cfg: RunConfig) -> Path:
    from synthesis.__main__ import run as synthesize
    syn = cfg.synthesis
    syn.out_dir = str(Path(cfg.run_dir) / "data")
    summary = synthesize(syn, contact_sheet=True)
    log.info("data: %s", summary["records"])
    return Path(syn.out_dir)


def corpus(records_by_split: dict, cfg: RunConfig) -> list[str]:
    """The text the tokenizers and the LLM learn from: every caption and prompt+answer of train."""
    texts = []
    for r in records_by_split["train"]:
        texts.extend(r.captions.values())
        texts.extend(cfg.text.prompt_template.format(p.question) + " " + p.answer for p in r.vqa)
    return texts


def step_tokenizers(cfg: RunConfig, data_root: Path) -> dict:
    step = Step(Path(cfg.run_dir), "tokenizers", {"data": data_fingerprint(data_root), "b": asdict(cfg.bootstrap)})
    if not step.done:
        step.dir.mkdir(parents=True, exist_ok=True)
        texts = corpus(read_split_records(data_root), cfg)
        SPTokenizer.train(texts, step.dir / "llm.model", cfg.bootstrap.llm_vocab_size)
        QFormerTokenizer.train_sentencepiece(texts, step.dir / "qformer.model", cfg.bootstrap.qformer_vocab_size)
        step.finish()
    return {"llm": SPTokenizer(step.dir / "llm.model"),
            "qformer": QFormerTokenizer.from_sentencepiece(step.dir / "qformer.model")}


def step_llm(cfg: RunConfig, data_root: Path, tok: SPTokenizer) -> Path:
    b = cfg.bootstrap
    step = Step(Path(cfg.run_dir), "llm", {"data": data_fingerprint(data_root), "llm": asdict(b.llm),
                                           "steps": b.llm_steps, "optim": asdict(b.llm_optim),
                                           "tokenizers": built_from(Path(cfg.run_dir) / "tokenizers")})
    folder = step.dir / "hf"
    if step.done:
        return folder
    L.seed_everything(cfg.seed, workers=True)
    texts = corpus(read_split_records(data_root), cfg)
    llm = LLaMA(_replace(b.llm, vocab_size=tok.vocab_size))
    enc = tok.batch_encode(texts, bos=True, eos=True, max_length=b.llm_max_len)
    ds = torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"])
    loader = torch.utils.data.DataLoader(ds, batch_size=b.llm_batch_size, shuffle=True,
                                         collate_fn=_trim_padding, drop_last=True)
    lit = LitCausalLM(llm, optim=b.llm_optim, total_steps=b.llm_steps)
    trainer(cfg, step.dir, max_steps=b.llm_steps, grad_clip=b.llm_optim.grad_clip).fit(
        lit, loader, ckpt_path=step.resume_path())
    save_hf_llama(llm, folder)
    step.finish(final_loss=float(trainer_loss(lit)))
    return folder


def _trim_padding(rows):
    ids = torch.stack([r[0] for r in rows])
    mask = torch.stack([r[1] for r in rows])
    T = int(mask.sum(1).max())
    return {"input_ids": ids[:, :T], "attention_mask": mask[:, :T]}


def trainer_loss(lit: L.LightningModule) -> float:
    m = lit.trainer.callback_metrics if lit.trainer else {}
    return float(m.get("train/loss", float("nan")))


def step_encoder(cfg: RunConfig, data_root: Path) -> Path:
    """The image encoder's weights file: `model.vision.pretrained` when the config names one (a real
    open_clip checkpoint swapped in, used as given), else the stand-in trained here on the labels."""
    if cfg.model.vision.pretrained:
        return Path(cfg.model.vision.pretrained)
    b = cfg.bootstrap
    # The stand-in for a pretrained encoder must not have seen the zero-shot AUs' labels: a real one
    # (EVA-CLIP) never saw AU labels at all, and Q3's zero-shot figures mean "never supervised".
    heldout = set(cfg.synthesis.vqa.heldout_aus)
    aus = tuple(a for a in LabelCollate.AUS if a not in heldout)
    step = Step(Path(cfg.run_dir), "encoder", {"data": data_fingerprint(data_root), "vision": asdict(cfg.model.vision),
                                               "steps": b.encoder_steps, "optim": asdict(b.encoder_optim),
                                               "heads": "flattened tokens", "aus": list(aus),
                                               "images": "cached, batch crop, transform interpolation"})
    path = step.dir / "encoder.pt"
    if step.done:
        return path
    L.seed_everything(cfg.seed, workers=True)
    encoder = VisionEncoder(_replace(cfg.model.vision, freeze=False))
    lit = LitEncoderPretrain(encoder, num_aus=len(aus), num_emotions=len(EMOTIONS),
                             optim=b.encoder_optim, total_steps=b.encoder_steps)
    # ~15 passes over the training faces (default 1400 steps x 64): decode + resize once (the eval
    # transform, cached), then the train transform's random crop on whole batches; decoding + open_clip's
    # PIL transform per face took ~98 ms per batch of 64 next to a 124 ms step (README "Results", item 10)
    data = StageDataModule(DataConfig(root=str(data_root), batch_size=b.encoder_batch_size,
                                      num_workers=cfg.data.num_workers, stream=cfg.data.stream),
                           expand=None, collate=LabelCollate(aus), transform=encoder.eval_transform,
                           val_transform=encoder.eval_transform, cache_images=True,
                           augment=batch_crop(encoder.train_transform))
    trainer(cfg, step.dir, max_steps=b.encoder_steps, grad_clip=b.encoder_optim.grad_clip).fit(lit, datamodule=data,
                                                                 ckpt_path=step.resume_path())
    torch.save({f"visual.{k}": v for k, v in encoder.visual.state_dict().items()}, path)
    step.finish(final_loss=trainer_loss(lit), aus=list(aus))
    return path


def batch_crop(train_transform) -> Callable | None:
    """The RandomResizedCrop of an open_clip train transform as a batch op (None if it has none)."""
    for t in getattr(train_transform, "transforms", []):
        if isinstance(t, RandomResizedCrop):
            return partial(random_resized_crop, scale=tuple(t.scale), ratio=tuple(t.ratio),
                           mode=t.interpolation.value)  # torchvision's "bicubic" / "bilinear" / "nearest"
    return None


def _replace(obj, **kw):
    from dataclasses import replace
    return replace(obj, **kw)


def frozen_encoder(cfg: RunConfig, encoder_path: Path | str) -> VisionEncoder:
    return VisionEncoder(_replace(cfg.model.vision, pretrained=str(encoder_path), freeze=True))


def step_features(cfg: RunConfig, data_root: Path, encoder: VisionEncoder,
                  cache_dir: Path | None = None) -> FeatureStore:
    """Frozen-encoder tokens of every split's images, cached in `cache_dir` (default run_dir/features)."""
    records = read_split_records(data_root)
    return FeatureStore.build(encoder, encoder.eval_transform,
                              ((r, data_root) for recs in records.values() for r in recs),
                              cache_dir or Path(cfg.run_dir) / "features", progress=cfg.trainer.progress_bar)


# ---- steps 6-8: the three stages ---------------------------------------------------------------------

def blip2_config(cfg: RunConfig, stage: str, tokenizers: dict, llm: LLaMA | None) -> Blip2Config:
    qcfg = _replace(cfg.model.qformer, vocab_size=tokenizers["qformer"].vocab_size,
                    pad_token_id=tokenizers["qformer"].pad_id)
    return Blip2Config(stage=stage, vision=cfg.model.vision, qformer=qcfg,
                       llm=None if llm is None else llm.config, embed_dim=cfg.model.embed_dim,
                       image_position=cfg.model.image_position)


def stage_data_config(cfg: RunConfig, stage: StageConfig, data_root: Path | str) -> DataConfig:
    """cfg.data with the stage's batch size and length grouping."""
    return _replace(cfg.data, root=str(data_root), batch_size=stage.batch_size,
                    stream=_replace(cfg.data.stream, group_by_length=stage.group_by_length))


def stage_data(cfg: RunConfig, stage: StageConfig, data_root: Path, collate, expand) -> StageDataModule:
    return StageDataModule(stage_data_config(cfg, stage, data_root), expand=expand, collate=collate)


def stage_trainer(cfg: RunConfig, name: str, stage: StageConfig) -> L.Trainer:
    """The Trainer of one stage in `run_dir/<name>/`. Built before anything is written: its
    `is_global_zero` (known from the launcher's environment before any process group exists) says
    which DDP process writes the run folder."""
    return trainer(cfg, Path(cfg.run_dir) / name, max_steps=stage.max_steps, grad_clip=stage.optim.grad_clip)


def run_stage(cfg: RunConfig, name: str, *, model: Blip2, lit_factory, data: StageDataModule,
              stage: StageConfig, inputs: dict, tr: L.Trainer | None = None) -> Path:
    """Fit one stage (resuming from its last checkpoint) and return the final trimmed checkpoint.

    Under DDP every rank calls this (with its `stage_trainer`, or one is built here); global rank 0
    alone writes, the others return once final.ckpt is complete. final.ckpt appears whole or not at
    all (os.replace of a file written beside it), so a reader never loads a partial checkpoint.
    """
    tr = stage_trainer(cfg, name, stage) if tr is None else tr
    step = Step(Path(cfg.run_dir), name, inputs, writer=tr.is_global_zero)
    final = step.dir / "final.ckpt"
    if step.done:
        return final
    L.seed_everything(cfg.seed, workers=True)
    lit = lit_factory(model)
    tr.fit(lit, datamodule=data, ckpt_path=step.resume_path())
    part = final.with_name(f".{final.name}.part")
    tr.save_checkpoint(part, weights_only=True)  # on every rank: rank 0 writes, then all meet at a barrier
    if tr.is_global_zero:
        ck = torch.load(part, map_location="cpu", weights_only=False)
        ck["run_config"] = json.loads(json.dumps(asdict(cfg), default=str))
        ck["stage"] = model.cfg.stage
        torch.save(ck, part)
        os.replace(part, final)
        step.finish(final_loss=trainer_loss(lit), trainable=lit.counts["trainable"], total=lit.counts["total"])
    tr.strategy.barrier("run_stage: final.ckpt")  # no rank returns a path to a file not yet there
    return final


def build_stage_model(cfg: RunConfig, stage: str, tokenizers: dict, encoder: VisionEncoder,
                      llm: LLaMA | None, inits: list[tuple[Path, tuple[str, ...]]]) -> Blip2:
    model = Blip2(blip2_config(cfg, stage, tokenizers, llm), vision=encoder, llm=llm)
    if inits:
        init_from_checkpoints(model, inits)
    return model


def language_lit(stage: StageConfig):
    """The LightningModule factory of stages 2 and 3 (run_stage calls it on the built model)."""
    return lambda model: LitLanguage(model, optim=stage.optim, total_steps=stage.max_steps, loss_norm=stage.loss_norm)


def instruct_inits(stage1_ckpt: Path, stage2_ckpt: Path) -> list[tuple[Path, tuple[str, ...]]]:
    """Stage 3's InstructBLIP-style init: the whole Q-Former from stage 1 (its text parts included),
    then what stage 2 trained on top (query side, ln_vision, llm_proj)."""
    return [(stage1_ckpt, ("ln_vision.", "qformer.")), (stage2_ckpt, ("ln_vision.", "qformer.", "llm_proj."))]


def run_pipeline(cfg: RunConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    t0 = time.time()
    timings = {}

    def timed(name, fn, *a, **k):
        s = time.time()
        out = fn(*a, **k)
        timings[name] = round(time.time() - s, 1)
        log.info("step %s: %.1fs", name, timings[name])
        return out

    data_root = timed("data", step_data, cfg)
    toks = timed("tokenizers", step_tokenizers, cfg, data_root)
    llm_dir = timed("llm", step_llm, cfg, data_root, toks["llm"])
    enc_path = timed("encoder", step_encoder, cfg, data_root)
    encoder = frozen_encoder(cfg, enc_path)
    features = timed("features", step_features, cfg, data_root, encoder)
    qtok, ltok = toks["qformer"], toks["llm"]
    # upstream parts by content (run_folder.py): a rebuilt data folder, tokenizer or LLM rebuilds the stages
    run = Path(cfg.run_dir)
    base = {"data": data_fingerprint(data_root), "features": features.key, "model": asdict(cfg.model),
            "tokenizers": built_from(run / "tokenizers"), "llm": built_from(run / "llm")}

    s1 = cfg.stage1
    m1 = build_stage_model(cfg, "pretrain", toks, encoder, None, [])
    ck1 = timed("stage1", run_stage, cfg, "stage1", model=m1, stage=s1,
                data=stage_data(cfg, s1, data_root, PretrainCollate(qtok, cfg.text, features),
                                caption_samples(s1.captions)),
                lit_factory=lambda m: LitPretrain(m, optim=s1.optim, total_steps=s1.max_steps,
                                                  dec_token_id=qtok.dec_id, pad_token_id=qtok.pad_id,
                                                  label_positives=s1.label_positives),
                inputs={**base, "stage": asdict(s1)})

    llm = load_hf_llama(llm_dir)
    s2 = cfg.stage2
    m2 = build_stage_model(cfg, "caption", toks, encoder, llm, [(ck1, ("ln_vision.", "qformer."))])
    ck2 = timed("stage2", run_stage, cfg, "stage2", model=m2, stage=s2,
                data=stage_data(cfg, s2, data_root, CaptionCollate(ltok, cfg.text, features),
                                caption_samples(s2.captions)),
                lit_factory=language_lit(s2),
                inputs={**base, "stage": asdict(s2), "init": built_from(ck1.parent)})

    s3 = cfg.stage3
    m3 = build_stage_model(cfg, "instruct", toks, encoder, llm, instruct_inits(ck1, ck2))
    ck3 = timed("stage3", run_stage, cfg, "stage3", model=m3, stage=s3,
                data=stage_data(cfg, s3, data_root, InstructCollate(qtok, ltok, cfg.text, features),
                                vqa_samples(s3.vqa_types)),
                lit_factory=language_lit(s3),
                inputs={**base, "stage": asdict(s3), "init": [built_from(ck1.parent), built_from(ck2.parent)]})

    from eval import evaluate_run
    metrics = timed("eval", evaluate_run, run_dir, split=cfg.eval.split, limit=cfg.eval.limit)
    summary = {"run_dir": str(run_dir), "seconds": round(time.time() - t0, 1), "steps": timings,
               "checkpoints": {"stage1": str(ck1), "stage2": str(ck2), "stage3": str(ck3)},
               "metrics": metrics.get("headline", {})}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
