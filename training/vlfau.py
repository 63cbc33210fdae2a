"""VL-FAU runs (Ge et al., ACM MM 2024): `python train.py --config vlfau_synthfacs` (or vlfau_bp4d).

What a run does, each part cached and resumable like pipeline.py's steps:

1. parts     the records, the frozen image encoder, the language model and its tokenizer. With
             `parts_from: default` (the SynthFACS recipe) they are the embedded default's bootstrap
             steps, run in that config's run folder or reused when it has them already; otherwise the
             local files the recipe names (data.root, model.vision.pretrained, llm, llm_tokenizer).
2. features  frozen-encoder tokens of every record, once for all folds (`<run_dir>/features`).
3. parts of the protocol, one model each: `main` (the dataset's own train / val / test splits) or
   `fold<k>` for k in test_folds (subject-exclusive, synthesis/readers/folds.py; the held-out
   subjects are the test set, the others train; no validation split, as the BP4D/DISFA protocols).
   Each trains `LitVLFAU` (lit_vlfau.py), writes `final.ckpt` (trained parameters only) and
   `metrics.json`: the AU head's F1 on the part's test records plus explanation agreement.
4. eval      `<run_dir>/eval/report.md`: per-AU F1 of the AU head (for folds: each AU's F1 averaged
             over the folds, the papers' protocol), explanations of a few test faces.

Where we differ from the paper (no official code exists): models/vlfau.py's docstring.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import torch

from expvl.configs import config_system, load_config, save_config
from expvl.configs.schema import RunConfig, VLFAURecipe
from expvl.datamodules.datamodule import StageDataModule
from expvl.datamodules.features import FeatureStore
from expvl.datamodules.images import load_image, load_transformed, resolve_image
from expvl.datamodules.labels import au_targets
from expvl.datamodules.vlfau import VLFAUCollate, vlfau_samples
from expvl.evaluation.vlfau import evaluate_vlfau
from expvl.models.convert import load_hf_llm
from expvl.models.convert.blip2_parts import copy_parts, load_qformer_checkpoint
from expvl.models.tokenizer import JSONTokenizer, SPTokenizer, llm_tokenizer
from expvl.models.vision import VisionConfig, VisionEncoder
from expvl.models.vlfau import VLFAU, VLFAUConfig, au_pos_weight
from expvl.synthesis.readers.folds import load_protocol, split_by_fold
from expvl.training.bootstrap import step_data, step_encoder, step_features, step_llm, step_tokenizers
from expvl.training.checkpoints import finish_checkpoint, load_trained
from expvl.training.lit_vlfau import LitVLFAU, trainable_prefixes
from expvl.training.run_folder import RunKindError, Step, data_fingerprint, trainer
from expvl.vocab.records import Record
from expvl.vocab.shards import read_split_records, write_shards

log = logging.getLogger(__name__)


@dataclass
class Parts:
    data_root: Path
    tokenizer: SPTokenizer | JSONTokenizer
    llm_dir: str  # Hugging Face folder of the language model ("" = a fresh decoder)
    vision: VisionConfig  # the frozen (or trainable) image encoder, with its local weights file


def resolve_parts(recipe: VLFAURecipe) -> Parts:
    """Step 1: the embedded default's bootstrap outputs, or the recipe's local files."""
    if recipe.parts_from:
        cfg = load_config(RunConfig, [recipe.parts_from])
        log.info("VL-FAU parts from %s (run folder %s)", recipe.parts_from, cfg.run_dir)
        data_root = step_data(cfg)
        tok = step_tokenizers(cfg, data_root)["llm"]
        llm_dir = step_llm(cfg, data_root, tok)
        vision = replace(cfg.model.vision, pretrained=str(step_encoder(cfg, data_root)), freeze=True)
        return Parts(Path(recipe.data.root) if recipe.data.root else data_root, tok, str(llm_dir), vision)
    return Parts(Path(recipe.data.root), llm_tokenizer(recipe.llm_tokenizer), recipe.llm, recipe.model.vision)


def part_names(recipe: VLFAURecipe) -> list[str]:
    """`main` (the dataset's own splits), or `fold<k>` for each held-out fold."""
    return [f"fold{k}" for k in recipe.test_folds] if recipe.fold_protocol else ["main"]


def protocol_splits(recipe: VLFAURecipe, data_root: Path, run_dir: Path) -> dict[str, Path]:
    """Step 3's parts: name -> dataset folder. Folds are written as shards of their own (images by path)."""
    if not recipe.fold_protocol:
        return {"main": data_root}
    protocol = load_protocol(recipe.fold_protocol)
    records = [r for recs in read_split_records(data_root).values() for r in recs]
    # the fold's shards live elsewhere: image paths become absolute so they still resolve
    records = [replace(r, image=str(resolve_image(r.image, data_root).resolve())) for r in records]
    out = {}
    for k in recipe.test_folds:
        split = split_by_fold(records, protocol, test_fold=k)
        folder = run_dir / f"fold{k}" / "data"
        write_shards(folder, {"train": split.train, "test": split.test}, cfg_hash=f"fold{k}", seed=recipe.seed,
                     shard_size=10_000, image_root=str(data_root))
        out[f"fold{k}"] = folder
    return out


def build_model(recipe: VLFAURecipe, parts: Parts, encoder: VisionEncoder,
                train: list[Record] | None = None) -> tuple[VLFAU, VLFAUConfig]:
    """The VL-FAU model of a recipe on its parts; `train` records give the BCE positive weights."""
    model_cfg = recipe.model
    if train is not None and recipe.pos_weight_from_train:
        labels = au_targets(train, model_cfg.aus)
        model_cfg = replace(model_cfg, pos_weight=au_pos_weight(labels["targets"], labels["annotated"]).tolist())
    llm = load_hf_llm(parts.llm_dir) if parts.llm_dir else None
    if llm is not None:
        model_cfg = replace(model_cfg, llm=llm.config)
    else:
        model_cfg = replace(model_cfg, llm=replace(model_cfg.llm, vocab_size=parts.tokenizer.vocab_size))
    model = VLFAU(replace(model_cfg, vision=parts.vision), vision=encoder, llm=llm)
    if recipe.qformer_checkpoint:
        load_qformer_init(model, recipe.qformer_checkpoint)
    return model, model_cfg


def load_qformer_init(model: VLFAU, path: str) -> None:
    """The Q-Former (strict, query-only) and ln_vision of a LAVIS checkpoint, or of a transformers Blip2
    folder / .safetensors file (its `post_layernorm`); the AU queries stay fresh."""
    parts = load_qformer_checkpoint(model.qformer, path)
    ln = {k: v for k, v in parts.items() if k.startswith("ln_vision.")}
    copy_parts(model, ln, path, required=("ln_vision.weight", "ln_vision.bias"))


def train_part(recipe: VLFAURecipe, name: str, data_root: Path, parts: Parts, features: FeatureStore | None,
               encoder: VisionEncoder) -> Path:
    """Step 3 for one part: fit (resuming), keep the trimmed final checkpoint, return its path."""
    splits = read_split_records(data_root)
    L.seed_everything(recipe.seed, workers=True)
    model, model_cfg = build_model(recipe, parts, encoder, splits["train"])
    step = Step(Path(recipe.run_dir), name, {
        "data": data_fingerprint(data_root), "model": asdict(model_cfg), "vision": asdict(parts.vision), "llm": parts.llm_dir,
        "optim": asdict(recipe.optim), "steps": recipe.max_steps, "seed": recipe.seed})
    final = step.dir / "final.ckpt"
    if step.done:
        return final
    lit = LitVLFAU(model, optim=recipe.optim, total_steps=recipe.max_steps)
    val_split = recipe.data.val_split if recipe.data.val_split in splits else ""
    data = StageDataModule(replace(recipe.data, root=str(data_root), val_split=val_split),
                           expand=vlfau_samples(model_cfg.aus),
                           collate=VLFAUCollate(parts.tokenizer, model_cfg, features),
                           transform=None if features else encoder.train_transform,
                           val_transform=None if features else encoder.eval_transform)
    tr = trainer(recipe, step.dir, max_steps=recipe.max_steps, grad_clip=recipe.optim.grad_clip)
    tr.fit(lit, datamodule=data, ckpt_path=step.resume_path(), weights_only=True)
    finish_checkpoint(tr, final, recipe)
    step.finish()
    return final


def run_vlfau(recipe: VLFAURecipe) -> dict:
    """Train every part of the protocol (each resumable), then evaluate the finished run as eval.py does."""
    t0 = time.time()
    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(recipe, run_dir / "config.yaml")
    parts = resolve_parts(recipe)
    encoder = VisionEncoder(parts.vision)
    # a frozen encoder without augmentation: every image is encoded once, as in the BLIP-2 pipeline
    features = step_features(recipe, parts.data_root, encoder) if parts.vision.freeze else None
    for name, data_root in protocol_splits(recipe, parts.data_root, run_dir).items():
        train_part(recipe, name, data_root, parts, features, encoder)
    metrics = evaluate_vlfau(open_vlfau_run(run_dir))
    summary = {"run_dir": str(run_dir), "seconds": round(time.time() - t0, 1), "metrics": metrics["headline"],
               "parts": metrics["parts"]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# ---- a finished VL-FAU run, opened again (runs.py open_run) ------------------------------------------

class VLFAURun:
    """A VL-FAU run folder: `recipe`, its `parts` (data, tokenizer, LLM folder, encoder config), the part
    names (`main`, or `fold<k>` per held-out fold), each part's data folder, trained model and test
    records, and `embed` to turn records into image embeddings for a model."""

    def __init__(self, run_dir: Path, recipe: VLFAURecipe):
        self.dir, self.recipe = Path(run_dir), recipe
        self.part_names = part_names(recipe)
        self._parts: Parts | None = None
        self._encoder = self._features = None
        self._models: dict[str, VLFAU] = {}

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            self._parts = resolve_parts(self.recipe)
        return self._parts

    @property
    def tokenizer(self):
        return self.parts.tokenizer

    @property
    def encoder(self) -> VisionEncoder:
        if self._encoder is None:
            self._encoder = VisionEncoder(self.parts.vision)
        return self._encoder

    @property
    def features(self) -> FeatureStore | None:
        """A frozen encoder's tokens of every record, once for all parts (None for a trained encoder)."""
        if self._features is None and self.parts.vision.freeze:
            self._features = step_features(self.recipe, self.parts.data_root, self.encoder, self.dir / "features")
        return self._features

    def data_root(self, part: str) -> Path:
        return self.parts.data_root if part == "main" else self.dir / part / "data"

    def test_records(self, part: str) -> list:
        return read_split_records(self.data_root(part))["test"]

    def model(self, part: str = "") -> VLFAU:
        """The trained model of `part` (default: main, else the first fold)."""
        part = part or self.part_names[0]
        if part not in self.part_names:
            raise ValueError(f"{self.dir}: no part {part!r}; its parts are {self.part_names}")
        if part not in self._models:
            final = self.dir / part / "final.ckpt"
            if not final.exists():
                raise FileNotFoundError(f"{final} not found: part {part!r} of {self.dir} has not finished training")
            model = build_model(self.recipe, self.parts, self.encoder)[0]
            load_trained(model, final, trainable_prefixes(model))
            self._models[part] = model.eval()
        return self._models[part]

    def embed(self, model: VLFAU, records, part: str) -> torch.Tensor:
        """(B, N, Dv) image embeddings after ln_vision: cached features, or the images through the encoder."""
        if self.features is not None:
            return model.embed_features(self.features.lookup([r.id for r in records]))
        root = self.data_root(part)
        return model.encode_image(torch.stack([load_transformed(resolve_image(r.image, root), self.encoder.eval_transform)
                                               for r in records]))

    def image_embeds_from_file(self, model: VLFAU, path) -> torch.Tensor:
        return model.encode_image(self.encoder.eval_transform(load_image(path))[None])


def open_vlfau_run(run_dir: str | Path) -> VLFAURun:
    """A VL-FAU run folder; its models run on the CPU. Another system's run folder is refused by what it is
    (its config.yaml's `system`), not by the first of its keys this schema lacks."""
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    system = config_system([config], default="vlfau") if config.exists() else "vlfau"
    if system != "vlfau":
        raise RunKindError(f"{run_dir} is a {system} run (its config.yaml says system: {system}), not a VL-FAU "
                           "one: VL-FAU's explanations need a run of train.py --config vlfau_*")
    return VLFAURun(run_dir, load_config(VLFAURecipe, [run_dir / "config.yaml"], [f"run_dir={run_dir}"]))
