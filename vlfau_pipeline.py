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
   Each trains `LitVLFAU` (models/lit_vlfau.py), writes `final.ckpt` (trained parameters only) and
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

from configs import load_config, save_config
from configs.schema import RunConfig, VLFAURecipe
from datamodules.datamodule import StageDataModule
from datamodules.features import FeatureStore
from datamodules.images import resolve_image
from models.convert import CheckpointError
from models.convert.eva import HF_LN_VISION
from models.convert.hf_blip2 import load_hf_qformer_file
from models.convert.lavis import load_lavis_qformer
from models.convert.llama import load_hf_llama
from models.lit_vlfau import LitVLFAU, VLFAUCollate, vlfau_samples
from models.metrics import AUMetrics
from models.probes import au_targets
from models.tokenizer import JSONTokenizer, SPTokenizer, llm_tokenizer
from models.vision import VisionConfig, VisionEncoder
from models.vlfau import VLFAU, Explanation, VLFAUConfig, au_pos_weight
from pipeline import step_data, step_encoder, step_features, step_llm, step_tokenizers
from run_folder import Step, data_fingerprint, trainer
from synthesis.readers.folds import load_protocol, split_by_fold
from synthesis.records import Record
from synthesis.shards import read_split_records, write_shards

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
    llm = load_hf_llama(parts.llm_dir) if parts.llm_dir else None
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
    if Path(path).is_dir() or path.endswith(".safetensors"):
        what, ln_prefix = "transformers checkpoint", HF_LN_VISION
        parts = load_hf_qformer_file(model.qformer, path)
    else:
        what, ln_prefix = "LAVIS checkpoint", "ln_vision."
        parts = load_lavis_qformer(model.qformer, path)
    ln = {k.removeprefix(ln_prefix): v for k, v in parts.items() if k.startswith(ln_prefix)}
    if set(ln) != {"weight", "bias"}:
        raise CheckpointError(f"{what} {path}: no {ln_prefix}weight / {ln_prefix}bias")
    try:
        model.ln_vision.load_state_dict(ln)
    except RuntimeError as e:
        raise CheckpointError(f"{what} {path}: ln_vision does not fit this encoder: {e}") from None


def train_part(recipe: VLFAURecipe, name: str, data_root: Path, parts: Parts, features: FeatureStore | None,
               encoder: VisionEncoder) -> tuple[VLFAU, Path]:
    """Step 3 for one part: fit (resuming), keep the trimmed final checkpoint, return the model."""
    splits = read_split_records(data_root)
    L.seed_everything(recipe.seed, workers=True)
    model, model_cfg = build_model(recipe, parts, encoder, splits["train"])
    step = Step(Path(recipe.run_dir), name, {
        "data": data_fingerprint(data_root), "model": asdict(model_cfg), "vision": asdict(parts.vision), "llm": parts.llm_dir,
        "optim": asdict(recipe.optim), "steps": recipe.max_steps, "seed": recipe.seed})
    final = step.dir / "final.ckpt"
    lit = LitVLFAU(model, optim=recipe.optim, total_steps=recipe.max_steps)
    if step.done:
        lit.load_state_dict(torch.load(final, map_location="cpu", weights_only=False)["state_dict"])
        return model.eval(), step.dir
    val_split = recipe.data.val_split if recipe.data.val_split in splits else ""
    data = StageDataModule(replace(recipe.data, root=str(data_root), val_split=val_split),
                           expand=vlfau_samples(model_cfg.aus),
                           collate=VLFAUCollate(parts.tokenizer, model_cfg, features),
                           transform=None if features else encoder.train_transform,
                           val_transform=None if features else encoder.eval_transform)
    tr = trainer(recipe, step.dir, max_steps=recipe.max_steps, grad_clip=recipe.optim.grad_clip)
    tr.fit(lit, datamodule=data, ckpt_path=step.resume_path())
    tr.save_checkpoint(final, weights_only=True)
    ck = torch.load(final, map_location="cpu", weights_only=False)
    ck["run_config"] = json.loads(json.dumps(asdict(recipe), default=str))
    torch.save(ck, final)
    step.finish()
    return model.eval(), step.dir


def load_trained(run_dir: str | Path, part: str = "") -> tuple[VLFAU, Parts, VisionEncoder]:
    """A finished VL-FAU run's model (its `main` part, or the first fold unless `part` names one)."""
    run_dir = Path(run_dir)
    recipe = load_config(VLFAURecipe, [run_dir / "config.yaml"], [f"run_dir={run_dir}"])
    part = part or ("main" if not recipe.fold_protocol else f"fold{recipe.test_folds[0]}")
    final = run_dir / part / "final.ckpt"
    if not final.exists():
        raise FileNotFoundError(f"{final} not found: part {part!r} of {run_dir} has not finished training")
    parts = resolve_parts(recipe)
    encoder = VisionEncoder(parts.vision)
    model, _ = build_model(recipe, parts, encoder)
    lit = LitVLFAU(model, optim=recipe.optim, total_steps=1)
    lit.load_state_dict(torch.load(final, map_location="cpu", weights_only=False)["state_dict"])
    return model.eval(), parts, encoder


@torch.no_grad()
def evaluate_part(model: VLFAU, records: list[Record], embed, tokenizer: SPTokenizer | JSONTokenizer, *,
                  explain: int, batch_size: int = 64) -> dict:
    """The AU head's F1 on `records` and explanations of the first `explain` of them.

    embed: records -> image_embeds (B, N, Dv) after ln_vision (cached features or the image path).
    """
    metrics = AUMetrics(model.cfg.aus)
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        probs = model.au_logits(model.query_features(embed(chunk))).sigmoid()
        labels = au_targets(chunk, model.cfg.aus)
        metrics.update((probs > model.cfg.threshold).long(), labels["targets"].long(), labels["annotated"])
    explained: list[Explanation] = model.explain(embed(records[:explain]), tokenizer) if explain else []
    n = max(1, len(explained))
    return {"au_classifier": metrics.compute(),
            "explanations": [{"id": r.id, **asdict(e)} for r, e in zip(records, explained)],
            "agreement": sum(e.agreement for e in explained) / n,
            "local_consistency": sum(e.local_consistency for e in explained) / n}


def fold_mean(parts: dict[str, dict]) -> dict:
    """AUMetrics-shaped result over parts: each AU's F1 averaged over the parts that score it."""
    if len(parts) == 1:
        return next(iter(parts.values()))["au_classifier"]
    per_au: dict[str, list[float]] = {}
    for m in parts.values():
        for au, f1 in m["au_classifier"]["f1"].items():
            per_au.setdefault(au, []).append(f1)
    f1 = {au: sum(v) / len(v) for au, v in per_au.items()}
    support = {au: sum(m["au_classifier"]["support"].get(au, 0) for m in parts.values()) for au in f1}
    return {"f1": f1, "macro_f1": sum(f1.values()) / len(f1), "support": support, "skipped": [],
            "folds": {name: m["au_classifier"]["macro_f1"] for name, m in parts.items()}}


def run_vlfau(recipe: VLFAURecipe) -> dict:
    from models.report import write_report

    t0 = time.time()
    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(recipe, run_dir / "config.yaml")
    parts = resolve_parts(recipe)
    encoder = VisionEncoder(parts.vision)
    # a frozen encoder without augmentation: every image is encoded once, as in the BLIP-2 pipeline
    features = step_features(recipe, parts.data_root, encoder) if parts.vision.freeze else None

    results, gallery = {}, []
    for name, data_root in protocol_splits(recipe, parts.data_root, run_dir).items():
        model, part_dir = train_part(recipe, name, data_root, parts, features, encoder)
        test = read_split_records(data_root)["test"]
        if features is not None:
            embed = (lambda recs, m=model: m.embed_features(features.lookup([r.id for r in recs])))
        else:
            from datamodules.images import load_transformed
            embed = (lambda recs, m=model, root=data_root: m.encode_image(torch.stack(
                [load_transformed(resolve_image(r.image, root), encoder.eval_transform) for r in recs])))
        results[name] = evaluate_part(model, test, embed, parts.tokenizer, explain=recipe.explain)
        (part_dir / "metrics.json").write_text(json.dumps(results[name], indent=1))
        log.info("VL-FAU %s: AU head macro-F1 %.3f", name, results[name]["au_classifier"]["macro_f1"])
        by_id = {r.id: r for r in test}
        for e in results[name]["explanations"][:6 if not gallery else 0]:
            r = by_id[e["id"]]
            lines = [f"{au}: {text}" for au, text in e["local"].items()] + [e["global_text"]]
            gallery.append({"image": resolve_image(r.image, data_root),
                            "title": f"predicted {', '.join(e['predicted']) or 'none'}; "
                                     f"annotated {', '.join(r.positive_aus) or 'none'}",
                            "text": "\n".join(lines)})

    head = fold_mean(results)
    metrics = {"au_classifier": head, "headline": {
        "au_macro_f1_classifier": head["macro_f1"],
        "explanation_agreement": sum(m["agreement"] for m in results.values()) / len(results)}}
    write_report(run_dir / "eval", metrics, gallery=gallery)
    summary = {"run_dir": str(run_dir), "seconds": round(time.time() - t0, 1), "metrics": metrics["headline"],
               "parts": {name: m["au_classifier"]["macro_f1"] for name, m in results.items()}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
