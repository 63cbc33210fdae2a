"""A run folder written by `python train.py` (pipeline.py), loaded back for evaluation and inference.

eval.py and benchmarks/bench_grouping.py read a run through `TrainedRun`: its config, tokenizers,
frozen encoder, LLM and each finished stage's model, loaded lazily and strictly (a stage that has
not finished raises, naming the missing checkpoint).

`open_run` picks the loader by the layout the folder's config.yaml says train.py wrote: `mode:
pipeline` (every step under the run folder) -> `TrainedRun`; `mode: stage` (one stage of a real
recipe, its parts read from the paths in the config) -> stage_run.py `StageRun`. Both give eval.py
the interface of `LoadedRun`.
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
from models.vision import VisionEncoder
from pipeline import STAGE_DIRS, build_stage_model, frozen_encoder, step_features


def read_run_config(run_dir: Path) -> RunConfig:
    from configs import load_config
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    return load_config(RunConfig, [path])


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when torch sees a GPU, else CPU) or a torch device name, refused when absent here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)  # an unknown name raises, naming it
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA device on this machine (use cpu or auto)")
    return device


def open_run(run_dir: str | Path, *, device: str = "cpu") -> LoadedRun:
    """The loader of the layout train.py wrote into `run_dir`, read off its config's `mode`; its
    models run on `device` (resolve_device)."""
    cfg = read_run_config(Path(run_dir))
    if cfg.mode == "stage":
        from stage_run import StageRun
        return StageRun(Path(run_dir), cfg, device=resolve_device(device))
    return TrainedRun(Path(run_dir), cfg, device=resolve_device(device))


class LoadedRun:
    """What eval.py reads from a run folder, whatever its layout: `cfg`, `data_root`, `tokenizers`
    ("qformer", "llm"), the frozen `encoder`, the `llm`, the `features` cache, `stage_model(stage)`,
    `trains(stage)` (which stages this kind of run trains at all), `heldout_aus` (never asked in the
    training split's Q3: the zero-shot AUs), `meta` (report lines) and the `device` its models run on
    (inputs go there through `image_embeds*` and Answerer; cached features stay on the CPU)."""

    dir: Path
    cfg: RunConfig
    data_root: Path
    tokenizers: dict
    encoder: VisionEncoder
    llm: LLaMA
    features: FeatureStore
    heldout_aus: list[str]
    device: torch.device
    MODE: str    # the config's `mode` this layout is written by
    LAYOUT: str  # how the wrong-mode error names this layout

    def __init__(self, run_dir: Path, cfg: RunConfig | None = None, *, device: torch.device | str = "cpu"):
        self.dir = Path(run_dir)
        self.cfg = read_run_config(self.dir) if cfg is None else cfg
        self.device = torch.device(device)
        if self.cfg.mode != self.MODE:
            raise ValueError(f"{self.dir / 'config.yaml'} has mode: {self.cfg.mode}, not {self.LAYOUT}: "
                             "open it with trained_run.open_run")

    @property
    def meta(self) -> dict:
        return {}  # a report header; the embedded default's report has none

    def trains(self, stage: str) -> bool:
        raise NotImplementedError

    def stage_model(self, stage: str) -> Blip2:
        raise NotImplementedError

    def image_embeds(self, model: Blip2, records) -> torch.Tensor:
        return model.embed_features(self.features.lookup([r.id for r in records]).to(self.device))

    def image(self, record):
        from datamodules.images import load_image, resolve_image
        return load_image(resolve_image(record.image, self.data_root))

    def image_embeds_from_file(self, model: Blip2, path) -> torch.Tensor:
        from datamodules.images import load_image
        pixels = self.encoder.eval_transform(load_image(path))[None].to(self.device)
        return model.encode_image(pixels)


class TrainedRun(LoadedRun):
    """A finished (or partly finished) run folder of the embedded default, loaded for evaluation and inference."""

    MODE, LAYOUT = "pipeline", "the embedded default's layout"

    def __init__(self, run_dir: Path, cfg: RunConfig | None = None, *, device: torch.device | str = "cpu"):
        super().__init__(run_dir, cfg, device=device)
        self.data_root = self.dir / "data"
        self.heldout_aus = list(self.cfg.synthesis.vqa.heldout_aus)  # its data step synthesized from this
        tok_dir = self.dir / "tokenizers"
        self.tokenizers = {"llm": SPTokenizer(tok_dir / "llm.model"),
                           "qformer": QFormerTokenizer.from_sentencepiece(tok_dir / "qformer.model")}
        # a real encoder named in the config replaced the stand-in (pipeline.step_encoder)
        encoder_file = self.cfg.model.vision.pretrained or self.dir / "encoder" / "encoder.pt"
        self.encoder = frozen_encoder(self.cfg, encoder_file).to(self.device)
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

    def trains(self, stage: str) -> bool:
        return stage in STAGE_DIRS  # the pipeline runs all three stages

    def stage_model(self, stage: str) -> Blip2:
        if stage not in self._models:
            ckpt = self.dir / STAGE_DIRS[stage] / "final.ckpt"
            if not ckpt.exists():
                raise FileNotFoundError(f"{ckpt} not found: stage {stage!r} has not finished in this run")
            llm = None if stage == "pretrain" else self.llm
            model = build_stage_model(self.cfg, stage, self.tokenizers, self.encoder, llm,
                                      [(ckpt, TRAINABLE[stage])])
            self._models[stage] = model.to(self.device).eval()
        return self._models[stage]
