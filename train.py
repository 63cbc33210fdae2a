"""Training entry point.

    python train.py                                   # the embedded default, end to end, on a CPU
    python train.py --config tiny                     # the same pipeline in about two minutes
    python train.py --config default trainer.accelerator=gpu trainer.precision=bf16-mixed
    python train.py --config recipes/expvqa_vicuna7b data.root=... pretrained.llm=...   # a real recipe

Configs are YAML files merged onto the typed schema (configs/schema.py) left to right, then
`key=value` overrides; a misspelled key is an error naming it. The resolved config is written to
`<run_dir>/config.yaml`. Rerunning the same command resumes: finished steps are skipped and an
interrupted stage continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> dict:
    from configs import load_config
    from configs.schema import RunConfig
    from pipeline import run_pipeline, run_single_stage

    p = argparse.ArgumentParser(prog="python train.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=[], help="YAML file(s) or names under configs/")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stage1.max_steps=50")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(RunConfig, args.config or ["default"], args.overrides)
    summary = run_pipeline(cfg) if cfg.mode == "pipeline" else run_single_stage(cfg)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
