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

import hashlib
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
from synthesis.facs import EMOTIONS
from synthesis.shards import read_split_records

log = logging.getLogger("pipeline")
STAGE_DIRS = {"pretrain": "stage1", "caption": "stage2", "instruct": "stage3"}  # a run folder's stage steps


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _relative(obj, run_dir: Path):
    """Paths inside the run folder written relative to it, so a moved or copied run keeps its cache."""
    prefix = f"{run_dir}{os.sep}"
    if isinstance(obj, dict):
        return {k: _relative(v, run_dir) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_relative(v, run_dir) for v in obj]
    if isinstance(obj, (str, Path)) and str(obj).startswith(prefix):
        return str(obj)[len(prefix):]
    return obj


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and os.replace: a reader (another rank, a
    rerun) sees the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Step:
    """A cached pipeline step in `run_dir/<name>/`, identified by the hash of its inputs.

    `inputs.json` is written when the step starts and `done.json` when it finishes. A rerun with the
    same inputs skips a finished step and resumes an unfinished one from its checkpoints; a folder
    built from other inputs is moved aside to `<name>.<old hash>` (never resumed, never deleted).

    Under DDP every rank builds the Step, and only global rank 0 (`writer=True`) moves, creates or
    writes anything. The other ranks cannot wait for it here: no process group exists before
    `Trainer.fit`, and Lightning's own launcher starts them only inside rank 0's `fit`. They read
    instead, and decide as rank 0 does whatever the interleaving: a folder with another hash is
    about to be moved aside, so for them the step is not done and has nothing to resume.
    """

    def __init__(self, run_dir: Path, name: str, inputs, *, writer: bool = True):
        self.dir, self.name, self.hash = run_dir / name, name, _hash(_relative(inputs, run_dir))
        self.t0 = time.time()
        self.writer = writer
        started = self.dir / "inputs.json"
        try:
            old = json.loads(started.read_text())["hash"]
        except FileNotFoundError:  # a new step, or rank 0 is moving an old folder aside right now
            old = None
        # no inputs.json: rank 0 moves nothing aside and keeps the folder, so every rank may resume from it
        self._ours = old in (None, self.hash)
        if not writer:
            return
        if not self._ours:
            aside = self.dir.with_name(f"{name}.{old}")
            log.warning("%s was built from other inputs (%s); moving it to %s and rebuilding",
                        self.dir, old, aside)
            self.dir.rename(aside)
            self._ours = True
        self.dir.mkdir(parents=True, exist_ok=True)
        if old != self.hash:  # rewriting an unchanged file would only give other ranks a torn read
            _write_atomic(started, json.dumps({"hash": self.hash}))

    @property
    def done(self) -> bool:
        return self._ours and (self.dir / "done.json").exists()

    def resume_path(self) -> str | None:
        """The checkpoint to resume from: the same on every rank, None for a folder being moved aside."""
        return _resume_path(self.dir) if self._ours else None

    def finish(self, **info) -> dict:
        if not self.writer:
            raise RuntimeError(f"{self.dir}: only the writing rank (global rank 0) finishes a step")
        info = {"hash": self.hash, "seconds": round(time.time() - self.t0, 1), **info}
        _write_atomic(self.dir / "done.json", json.dumps(info, indent=1))
        return info

    def info(self) -> dict:
        return json.loads((self.dir / "done.json").read_text())


def trainer(cfg: RunConfig, out_dir: Path, *, max_steps: int, grad_clip: float) -> L.Trainer:
    t = cfg.trainer
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True,
                                                     every_n_train_steps=t.ckpt_every_n_steps, save_top_k=0)]
    return L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                     precision=t.precision, max_steps=max_steps, max_epochs=-1, callbacks=callbacks,
                     log_every_n_steps=t.log_every_n_steps, default_root_dir=str(out_dir),
                     enable_progress_bar=t.progress_bar, enable_model_summary=False,
                     gradient_clip_val=grad_clip or None,
                     num_sanity_val_steps=0, limit_val_batches=t.limit_val_batches,
                     val_check_interval=t.val_check_interval, check_val_every_n_epoch=None, logger=False)


def _resume_path(out_dir: Path) -> str | None:
    """The newest resume point: our periodic last.ckpt, or the one Lightning wrote on SLURM's SIGUSR1."""
    found = [p for p in [out_dir / "checkpoints" / "last.ckpt", *out_dir.glob("hpc_ckpt_*.ckpt")] if p.exists()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


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
    step = Step(Path(cfg.run_dir), "tokenizers", {"data": str(data_root), "b": asdict(cfg.bootstrap)})
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
    step = Step(Path(cfg.run_dir), "llm", {"data": str(data_root), "llm": asdict(b.llm), "steps": b.llm_steps,
                                           "optim": asdict(b.llm_optim), "vocab": tok.vocab_size})
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
        lit, loader, ckpt_path=_resume_path(step.dir))
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
    b = cfg.bootstrap
    # The stand-in for a pretrained encoder must not have seen the zero-shot AUs' labels: a real one
    # (EVA-CLIP) never saw AU labels at all, and Q3's zero-shot figures mean "never supervised".
    heldout = set(cfg.synthesis.vqa.heldout_aus)
    aus = tuple(a for a in LabelCollate.AUS if a not in heldout)
    step = Step(Path(cfg.run_dir), "encoder", {"data": str(data_root), "vision": asdict(cfg.model.vision),
                                               "steps": b.encoder_steps, "optim": asdict(b.encoder_optim),
                                               "heads": "flattened tokens", "aus": list(aus),
                                               "images": "cached, batch crop, transform interpolation"})
    path = step.dir / "encoder.pt"
    if step.done:
        return path
    L.seed_everything(cfg.seed, workers=True)
    encoder = VisionEncoder(_replace(cfg.model.vision, freeze=False, pretrained=""))
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
                                                                 ckpt_path=_resume_path(step.dir))
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


def frozen_encoder(cfg: RunConfig, encoder_path: Path) -> VisionEncoder:
    return VisionEncoder(_replace(cfg.model.vision, pretrained=str(encoder_path), freeze=True))


def step_features(cfg: RunConfig, data_root: Path, encoder: VisionEncoder) -> FeatureStore:
    records = read_split_records(data_root)
    return FeatureStore.build(encoder, encoder.eval_transform,
                              ((r, data_root) for recs in records.values() for r in recs),
                              Path(cfg.run_dir) / "features", progress=cfg.trainer.progress_bar)


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
    base = {"data": str(data_root), "features": features.key, "model": asdict(cfg.model)}

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
                inputs={**base, "stage": asdict(s2), "init": str(ck1)})

    s3 = cfg.stage3
    m3 = build_stage_model(cfg, "instruct", toks, encoder, llm, instruct_inits(ck1, ck2))
    ck3 = timed("stage3", run_stage, cfg, "stage3", model=m3, stage=s3,
                data=stage_data(cfg, s3, data_root, InstructCollate(qtok, ltok, cfg.text, features),
                                vqa_samples(s3.vqa_types)),
                lit_factory=language_lit(s3),
                inputs={**base, "stage": asdict(s3), "init": [str(ck1), str(ck2)]})

    from eval import evaluate_run
    metrics = timed("eval", evaluate_run, run_dir, split=cfg.eval.split, limit=cfg.eval.limit)
    summary = {"run_dir": str(run_dir), "seconds": round(time.time() - t0, 1), "steps": timings,
               "checkpoints": {"stage1": str(ck1), "stage2": str(ck2), "stage3": str(ck3)},
               "metrics": metrics.get("headline", {})}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
