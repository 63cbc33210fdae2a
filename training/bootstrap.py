"""The embedded default's first steps: the data, and the "pretrained" parts real runs would download.

Offline, nothing can be downloaded, so `python train.py` builds stand-ins and freezes them before the
three stages run exactly as in the papers (pipeline.py runs these steps in order):

1. data        SynthFACS faces + rule-based (or LLM) captions + VQA pairs (synthesis/build.py)
2. tokenizers  SentencePiece for the LLM and for the Q-Former, trained on the synthesized text
3. llm         a small LLaMA trained as a causal LM on that text, saved as a Hugging Face folder and
               loaded back through models/convert/llama.py exactly like a real checkpoint
4. encoder     the tiny conv tower trained with AU / emotion heads on the labels of the AUs Q3 asks
               about (never the held-out zero-shot AUs), then frozen; a real encoder named in
               `model.vision.pretrained` replaces it
5. features    the frozen encoder's tokens, cached once for every split

Each step is a `Step` of the run folder (run_folder.py): cached by the hash of its inputs, resumed
from its last checkpoint when it was cut short.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torchvision.transforms import RandomResizedCrop

from expvl.configs.schema import RunConfig
from expvl.datamodules.datamodule import DataConfig, StageDataModule
from expvl.datamodules.features import FeatureStore
from expvl.datamodules.images import random_resized_crop
from expvl.datamodules.labels import LabelCollate
from expvl.models.convert.hf_export import save_hf_llama
from expvl.models.llm import LLaMA
from expvl.models.tokenizer import QFormerTokenizer, SPTokenizer
from expvl.models.vision import VisionEncoder
from expvl.synthesis.build import run as synthesize
from expvl.training.lit_bootstrap import LitCausalLM, LitEncoderPretrain
from expvl.training.run_folder import Step, built_from, data_fingerprint, trainer, trainer_loss
from expvl.vocab.facs import EMOTIONS
from expvl.vocab.shards import read_split_records

log = logging.getLogger("pipeline")


def step_data(cfg: RunConfig) -> Path:
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
    llm = LLaMA(replace(b.llm, vocab_size=tok.vocab_size))
    enc = tok.batch_encode(texts, bos=True, eos=True, max_length=b.llm_max_len)
    ds = torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"])
    loader = torch.utils.data.DataLoader(ds, batch_size=b.llm_batch_size, shuffle=True,
                                         collate_fn=_trim_padding, drop_last=True)
    lit = LitCausalLM(llm, optim=b.llm_optim, total_steps=b.llm_steps)
    trainer(cfg, step.dir, max_steps=b.llm_steps, grad_clip=b.llm_optim.grad_clip).fit(
        lit, loader, ckpt_path=step.resume_path(), weights_only=True)
    save_hf_llama(llm, folder)
    step.finish(final_loss=float(trainer_loss(lit)))
    return folder


def _trim_padding(rows):
    ids = torch.stack([r[0] for r in rows])
    mask = torch.stack([r[1] for r in rows])
    T = int(mask.sum(1).max())
    return {"input_ids": ids[:, :T], "attention_mask": mask[:, :T]}


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
    encoder = VisionEncoder(replace(cfg.model.vision, freeze=False))
    lit = LitEncoderPretrain(encoder, num_aus=len(aus), num_emotions=len(EMOTIONS),
                             optim=b.encoder_optim, total_steps=b.encoder_steps)
    # many passes over the training faces: decode + resize once (the eval transform, cached), then the
    # train transform's random crop on whole batches, instead of decoding and transforming every face
    # again in every pass
    data = StageDataModule(DataConfig(root=str(data_root), batch_size=b.encoder_batch_size,
                                      num_workers=cfg.data.num_workers, stream=cfg.data.stream),
                           expand=None, collate=LabelCollate(aus), transform=encoder.eval_transform,
                           val_transform=encoder.eval_transform, cache_images=True,
                           augment=batch_crop(encoder.train_transform))
    trainer(cfg, step.dir, max_steps=b.encoder_steps, grad_clip=b.encoder_optim.grad_clip).fit(
        lit, datamodule=data, ckpt_path=step.resume_path(), weights_only=True)
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


def frozen_encoder(cfg: RunConfig, encoder_path: Path | str) -> VisionEncoder:
    return VisionEncoder(replace(cfg.model.vision, pretrained=str(encoder_path), freeze=True))


def step_features(cfg: RunConfig, data_root: Path, encoder: VisionEncoder,
                  cache_dir: Path | None = None) -> FeatureStore:
    """Frozen-encoder tokens of every split's images, cached in `cache_dir` (default run_dir/features)."""
    records = read_split_records(data_root)
    return FeatureStore.build(encoder, encoder.eval_transform,
                              ((r, data_root) for recs in records.values() for r in recs),
                              cache_dir or Path(cfg.run_dir) / "features", progress=cfg.trainer.progress_bar)
