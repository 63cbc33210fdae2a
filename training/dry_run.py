"""`train.py --dry-run`: check a job before it queues, train nothing.

The config is already valid when it gets here (the schema's checks ran at load). This adds what only
the file system can tell: every path the run would read exists and is what it should be (a data
folder written by `python -m expvl.synthesis`, a weights file, a Hugging Face folder of a supported
family, a tokenizer that loads), and the stage's model builds on the meta device (no memory, no
weights read) from its configs, so a width that does not fit its neighbour fails here and not on the
cluster. It returns a summary of what would run; the SLURM renderer (slurm.py) runs the same checks.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from expvl.configs.schema import RunConfig, VLFAURecipe
from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.convert.hf_llm import SUPPORTED, hf_model_type
from expvl.models.tokenizer import QFormerTokenizer, llm_tokenizer
from expvl.models.vision import VisionEncoder
from expvl.training.stages import STAGES


class DryRunError(ValueError):
    """What the job would fail on, found before it runs (names the key and the path)."""


def _exists(key: str, path: str, *, folder: bool | None = None, inside: str = "") -> Path:
    p = Path(path)
    if not p.exists():
        raise DryRunError(f"{key}: {p} does not exist")
    if folder is True and not p.is_dir():
        raise DryRunError(f"{key}: {p} is not a folder")
    if folder is False and p.is_dir() and not (p / "config.json").exists():
        raise DryRunError(f"{key}: {p} is a folder, not a file")
    if inside and not (p / inside).exists():
        raise DryRunError(f"{key}: {p} has no {inside}")
    return p


def _data(key: str, root: str) -> dict:
    manifest = _exists(key, root, folder=True, inside="manifest.json") / "manifest.json"
    try:
        counts = json.loads(manifest.read_text()).get("counts", {})
    except json.JSONDecodeError as e:
        raise DryRunError(f"{key}: {manifest} is not valid JSON ({e})") from None
    return {"data": str(root), "records": counts}


def _llm(key: str, folder: str) -> str:
    _exists(key, folder, folder=True, inside="config.json")
    family = hf_model_type(folder)
    if family not in SUPPORTED:
        raise DryRunError(f"{key}: {folder} holds a {family!r} model; supported: {', '.join(SUPPORTED)}")
    return family


def _meta_model(cfg: RunConfig, tokenizers: dict) -> dict:
    """The stage's model without its LLM, built on meta from the configs alone: its sizes fit together."""
    stage = STAGES[cfg.stage]
    qcfg = replace(cfg.model.qformer, vocab_size=tokenizers["qformer"].vocab_size,
                   pad_token_id=tokenizers["qformer"].pad_id)
    with torch.device("meta"):
        vision = VisionEncoder(replace(cfg.model.vision, pretrained=""))
        model = Blip2(Blip2Config(stage="pretrain", vision=cfg.model.vision, qformer=qcfg, embed_dim=cfg.model.embed_dim,
                                  image_position=cfg.model.image_position), vision=vision)
    trained = sum(p.numel() for n, p in model.named_parameters() if n.startswith(stage.trains))
    return {"encoder_width": vision.width, "qformer_parameters": trained}


def dry_run(cfg: RunConfig | VLFAURecipe) -> dict:
    """Check what `cfg` would read and build; return a summary, or raise DryRunError naming the problem."""
    if isinstance(cfg, VLFAURecipe):
        out = {"system": "vlfau", "run_dir": cfg.run_dir, "parts_from": cfg.parts_from or None}
        if not cfg.parts_from:
            out.update(_data("data.root", cfg.data.root))
            _exists("model.vision.pretrained", cfg.model.vision.pretrained)
            _exists("llm_tokenizer", cfg.llm_tokenizer, folder=False)
            if cfg.llm:
                out["llm_family"] = _llm("llm", cfg.llm)
        if cfg.qformer_checkpoint:
            _exists("qformer_checkpoint", cfg.qformer_checkpoint)
        return out
    if cfg.mode == "pipeline":  # the embedded default builds every part itself
        steps = ["data", "tokenizers", "llm", "encoder", "features", *(s.folder for s in STAGES.values()), "eval"]
        done = [s for s in steps if (Path(cfg.run_dir) / s / "done.json").exists()]
        return {"mode": "pipeline", "run_dir": cfg.run_dir, "steps": steps, "finished": done}
    p, out = cfg.pretrained, {"mode": "stage", "stage": cfg.stage, "run_dir": cfg.run_dir}
    out.update(_data("data.root", cfg.data.root))
    if cfg.model.vision.pretrained:
        _exists("model.vision.pretrained", cfg.model.vision.pretrained)
    for key in ("lavis_checkpoint", "hf_checkpoint"):
        if getattr(p, key):
            _exists(f"pretrained.{key}", getattr(p, key))
    for i, path in enumerate(p.init_checkpoints):
        _exists(f"pretrained.init_checkpoints[{i}]", path, folder=False)
    tokenizers = {"qformer": QFormerTokenizer.from_bert_vocab(_exists("pretrained.qformer_vocab", p.qformer_vocab,
                                                                      folder=False))}
    if STAGES[cfg.stage].needs_llm:
        out["llm_family"] = _llm("pretrained.llm", p.llm)
        tok = llm_tokenizer(_exists("pretrained.llm_tokenizer", p.llm_tokenizer, folder=False),
                            convention=p.llm_convention)
        out["llm_vocab"] = tok.vocab_size
    out.update(_meta_model(cfg, tokenizers))
    st = STAGES[cfg.stage].settings(cfg)
    t = cfg.trainer
    devices = t.devices if isinstance(t.devices, int) else len(t.devices) if isinstance(t.devices, list) else 1
    out.update(max_steps=st.max_steps, global_batch=st.batch_size * devices * t.num_nodes * t.accumulate_grad_batches)
    return out
