"""A run folder written by `python train.py` (pipeline.py), loaded back for evaluation and inference.

eval.py and benchmarks/bench_grouping.py read a run through `TrainedRun`: its config, tokenizers,
frozen encoder, LLM and each finished stage's model, loaded lazily and strictly (a stage that has
not finished raises, naming the missing checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch

from configs.schema import RunConfig
from datamodules.features import FeatureStore
from models.blip2 import Blip2
from models.convert.llama import load_hf_llama
from models.lit_blip2 import TRAINABLE
from models.llm import LLaMA
from models.tokenizer import QFormerTokenizer, SPTokenizer
from pipeline import STAGE_DIRS, build_stage_model, frozen_encoder, step_features


class TrainedRun:
    """A finished (or partly finished) run folder, loaded for evaluation and inference."""

    def __init__(self, run_dir: Path):
        from configs import load_config
        self.dir = Path(run_dir)
        if not (self.dir / "config.yaml").exists():
            raise FileNotFoundError(f"{self.dir} is not a run folder (no config.yaml)")
        self.cfg = load_config(RunConfig, [self.dir / "config.yaml"])
        self.data_root = self.dir / "data"
        tok_dir = self.dir / "tokenizers"
        self.tokenizers = {"llm": SPTokenizer(tok_dir / "llm.model"),
                           "qformer": QFormerTokenizer.from_sentencepiece(tok_dir / "qformer.model")}
        self.encoder = frozen_encoder(self.cfg, self.dir / "encoder" / "encoder.pt")
        self._llm = None
        self._features = None
        self._models = {}

    @property
    def llm(self) -> LLaMA:
        if self._llm is None:
            self._llm = load_hf_llama(self.dir / "llm" / "hf").eval()
        return self._llm

    @property
    def features(self) -> FeatureStore:
        if self._features is None:
            self._features = step_features(self.cfg, self.data_root, self.encoder)
        return self._features

    def stage_model(self, stage: str) -> Blip2:
        if stage not in self._models:
            ckpt = self.dir / STAGE_DIRS[stage] / "final.ckpt"
            if not ckpt.exists():
                raise FileNotFoundError(f"{ckpt} not found: stage {stage!r} has not finished in this run")
            llm = None if stage == "pretrain" else self.llm
            model = build_stage_model(self.cfg, stage, self.tokenizers, self.encoder, llm,
                                      [(ckpt, TRAINABLE[stage])])
            self._models[stage] = model.eval()
        return self._models[stage]

    def image_embeds(self, model: Blip2, records) -> torch.Tensor:
        return model.embed_features(self.features.lookup([r.id for r in records]))

    def image(self, record):
        from datamodules.images import load_image, resolve_image
        return load_image(resolve_image(record.image, self.data_root))

    def image_embeds_from_file(self, model: Blip2, path) -> torch.Tensor:
        from datamodules.images import load_image
        pixels = self.encoder.eval_transform(load_image(path))[None]
        return model.encode_image(pixels)
