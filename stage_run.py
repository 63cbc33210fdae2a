"""A run folder written by `python train.py mode=stage` (single_stage.py), loaded back for evaluation.

Such a folder holds only `config.yaml` and `<STAGE_DIRS[stage]>/final.ckpt`; everything else is read
from the local paths its config names, as training read them: the tokenizers and the LLM from
`pretrained.*`, the image encoder from `model.vision.pretrained`, the records from `data.root`. The
model is built by the same code as in training (single_stage.py `build_stage_parts`: same vocabulary
growth, same config) and starts from the same LAVIS / init checkpoints (`init_stage_weights`: an init
checkpoint may hand on an encoder its stage fine-tuned, which a stage with a frozen encoder keeps but
does not save), then final.ckpt is loaded strictly: exactly the tensors the stage trained
(models/lit_blip2.py `trainable_prefixes`), each of its shape.

One run trains one stage: `trains(stage)` says which, so eval.py skips (with a note) what needs
another stage's model, e.g. the Exp-BLIP probes of a stage-2 model in a stage-3 run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from configs.schema import RunConfig
from datamodules.features import FeatureStore
from models.blip2 import Blip2
from models.convert import CheckpointError
from models.convert.stages import checkpoint_tensors, read_lightning_checkpoint
from models.lit_blip2 import trainable_prefixes
from models.llm import LLaMA
from models.vision import VisionEncoder
from pipeline import STAGE_DIRS, step_features
from single_stage import StageParts, build_stage_parts, init_stage_weights
from trained_run import LoadedRun


def load_final_checkpoint(model: Blip2, path: Path, stage: str) -> None:
    """Exactly the tensors `stage` trained into `model`; anything missing, extra or mis-shaped raises."""
    ck = read_lightning_checkpoint(path)
    if ck.get("stage") != stage:
        raise CheckpointError(f"{path} was written by stage {ck.get('stage')!r}, the run's config says {stage!r}")
    tensors = checkpoint_tensors(ck)
    prefixes = trainable_prefixes(model)
    ours = model.state_dict()
    want = {k for k in ours if k.startswith(prefixes)}
    missing, unexpected = sorted(want - tensors.keys()), sorted(tensors.keys() - want)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not hold what stage {stage!r} trained: missing {missing[:5]} "
                              f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    for key, t in tensors.items():
        if tuple(t.shape) != tuple(ours[key].shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, the stage {stage!r} model "
                                  f"wants {tuple(ours[key].shape)}")
    model.load_state_dict(tensors, strict=False)


def data_heldout_aus(data_root: Path) -> list[str]:
    """The zero-shot AUs of a data folder: the `vqa.heldout_aus` it was synthesized with (the run's
    own `synthesis` section describes no data here: mode=stage reads data.root as it is)."""
    from configs import load_config
    from synthesis.config import SynthesisConfig

    path = data_root / "synthesis_config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: data.root must be a folder written by `python -m synthesis`")
    return list(load_config(SynthesisConfig, [path]).vqa.heldout_aus)


class StageRun(LoadedRun):
    """A `mode: stage` run folder: one trained stage, its parts at the paths of its config."""

    MODE, LAYOUT = "stage", "a stage run's"

    def __init__(self, run_dir: Path, cfg: RunConfig | None = None, *, device: torch.device | str = "cpu"):
        super().__init__(run_dir, cfg, device=device)
        self.stage = self.cfg.stage
        self.checkpoint = self.dir / STAGE_DIRS[self.stage] / "final.ckpt"
        self.data_root = Path(self.cfg.data.root)
        self.heldout_aus = data_heldout_aus(self.data_root)
        self._parts: StageParts | None = None
        self._features: FeatureStore | None = None

    @property
    def meta(self) -> dict:
        return {"run": f"mode: stage, stage: {self.stage}", "checkpoint": str(self.checkpoint),
                "data": str(self.data_root)}

    def trains(self, stage: str) -> bool:
        return stage == self.stage

    @property
    def _built(self) -> StageParts:
        if self._parts is None:
            if not self.checkpoint.exists():
                raise FileNotFoundError(f"{self.checkpoint} not found: stage {self.stage!r} has not finished "
                                        "in this run")
            parts = build_stage_parts(self.cfg)
            init_stage_weights(parts.model, self.cfg.pretrained)
            load_final_checkpoint(parts.model, self.checkpoint, self.stage)
            parts.model.to(self.device).eval()  # the encoder and LLM are its submodules
            self._parts = parts
        return self._parts

    @property
    def tokenizers(self) -> dict:
        return self._built.tokenizers

    @property
    def encoder(self) -> VisionEncoder:
        return self._built.encoder  # the model's own: trained weights when the stage trained it

    @property
    def llm(self) -> LLaMA:
        if self._built.llm is None:
            raise ValueError(f"{self.dir}: a stage {self.stage!r} run has no LLM")
        return self._built.llm

    @property
    def features(self) -> FeatureStore:
        """Encoder tokens of every split, cached under the run folder (keyed by the encoder's weights)."""
        if self._features is None:
            self._features = step_features(self.cfg, self.data_root, self.encoder, self.dir / "features")
        return self._features

    def stage_model(self, stage: str) -> Blip2:
        if not self.trains(stage):
            raise FileNotFoundError(f"{self.dir} trained stage {self.stage!r} only (mode: stage): it has no "
                                    f"{stage!r} model ({self.dir / STAGE_DIRS[stage] / 'final.ckpt'})")
        return self._built.model
