"""The embedded default, step by step: data -> "pretrained" parts -> stages 1-3 -> evaluation.

`python train.py` with no arguments runs `run_pipeline(load_config(RunConfig, ["default"]))`:

    data, tokenizers, llm, encoder, features    bootstrap.py: the stand-ins real runs download
    stage1 (pretrain), stage2 (caption),        stages.py: each row of the stage table in order, started
    stage3 (instruct)                           from the checkpoints of the stages it inits from
    eval                                        the finished run opened by runs.py, handed to
                                                expvl.evaluation (AU F1, emotion accuracy, report)

Every step writes its output under `run_dir/<step>/` with a `done.json` naming the hash of what it
was built from; a rerun skips finished steps, and a step whose inputs changed is moved aside and
rebuilt. A killed stage resumes from its last checkpoint (Lightning `ckpt_path`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from expvl.configs import save_config
from expvl.configs.schema import RunConfig
from expvl.evaluation.evaluate import evaluate
from expvl.models.convert import load_hf_llm
from expvl.training.bootstrap import (
    frozen_encoder,
    step_data,
    step_encoder,
    step_features,
    step_llm,
    step_tokenizers,
)
from expvl.training.run_folder import built_from, data_fingerprint
from expvl.training.runs import open_run
from expvl.training.stages import STAGES, build_stage_model, run_stage, stage_data

log = logging.getLogger("pipeline")


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
    # upstream parts by content (run_folder.py): a rebuilt data folder, tokenizer or LLM rebuilds the stages
    base = {"data": data_fingerprint(data_root), "features": features.key, "model": asdict(cfg.model),
            "tokenizers": built_from(run_dir / "tokenizers"), "llm": built_from(run_dir / "llm")}

    llm, checkpoints = None, {}
    for stage in STAGES.values():
        if stage.needs_llm and llm is None:
            llm = load_hf_llm(llm_dir)
        model = build_stage_model(cfg, stage.name, toks, encoder, llm if stage.needs_llm else None,
                                  [(checkpoints[s], STAGES[s].hands_on) for s in stage.init_from])
        inputs = {**base, "stage": asdict(stage.settings(cfg))}
        if stage.init_from:  # one earlier stage is named by its hash, several by the list of theirs
            inits = [built_from(checkpoints[s].parent) for s in stage.init_from]
            inputs["init"] = inits[0] if len(inits) == 1 else inits
        checkpoints[stage.name] = timed(stage.folder, run_stage, cfg, stage, model=model, tokenizers=toks,
                                        data=stage_data(cfg, stage, data_root, toks, features=features),
                                        inputs=inputs)

    metrics = timed("eval", evaluate, open_run(run_dir), split=cfg.eval.split, limit=cfg.eval.limit)
    summary = {"run_dir": str(run_dir), "seconds": round(time.time() - t0, 1), "steps": timings,
               "checkpoints": {STAGES[s].folder: str(ck) for s, ck in checkpoints.items()},
               "metrics": metrics.get("headline", {})}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
