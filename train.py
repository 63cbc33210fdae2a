"""Training entry point.

    python train.py                                   # the embedded default, end to end, on a CPU
    python train.py --config tiny                     # the same pipeline at toy sizes, for a first look
    python train.py --config default trainer.accelerator=gpu trainer.precision=bf16-mixed
    python train.py --config recipes/expvqa_vicuna7b data.root=... pretrained.llm=...   # a real recipe
    python train.py --config vlfau_synthfacs          # VL-FAU on the default's data, encoder and LLM

    python train.py --config recipes/_blip2_vitg --config recipes/expblip_stage1 --dry-run   # check a job

Configs are YAML files merged onto the typed schema (configs/schema.py) left to right, then
`key=value` overrides; a misspelled key is an error naming it. A config's `system` key picks the
schema: blip2 (RunConfig, the default) or vlfau (VLFAURecipe). The resolved config is written to
`<run_dir>/config.yaml` (`--print-config` prints it and stops; `--dry-run` also checks every path the
run would read and builds the model on the meta device, training nothing). Rerunning the same command
resumes: finished steps are skipped and an interrupted stage continues from its last checkpoint; a
stage cut short by `trainer.max_time` exits with code 3 (rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from expvl.configs import ConfigError, config_system, load_config, to_yaml
from expvl.configs.schema import SCHEMAS
from expvl.training.dry_run import DryRunError, dry_run
from expvl.training.run_folder import TrainingStopped

STOPPED = 3  # the exit code of a run cut short by trainer.max_time: rerun the same command to resume


def main(argv: list[str] | None = None) -> dict:
    from expvl.training.pipeline import run_pipeline
    from expvl.training.single_stage import run_single_stage
    from expvl.training.vlfau import run_vlfau

    p = argparse.ArgumentParser(prog="python train.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=[], help="YAML file(s) or names under configs/")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and stop")
    p.add_argument("--dry-run", action="store_true", help="check every path and build the model on meta; "
                   "train nothing")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stage1.max_steps=50")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    files = args.config or ["default"]
    system = config_system(files, args.overrides)
    if system not in SCHEMAS:
        raise ConfigError(f"system: {system!r} is not one of {sorted(SCHEMAS)}")
    cfg = load_config(SCHEMAS[system], files, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return {"config": to_yaml(cfg)}
    if args.dry_run:
        summary = {"dry_run": "ok", **dry_run(cfg)}
        print(json.dumps(summary, indent=1))
        return summary
    if system == "vlfau":
        summary = run_vlfau(cfg)
    elif cfg.mode == "pipeline":
        summary = run_pipeline(cfg)
    else:
        summary = run_single_stage(cfg)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ConfigError, DryRunError) as e:  # the message names the file / key; a traceback would only bury it
        sys.exit(f"config error: {e}")
    except TrainingStopped as e:
        print(e, file=sys.stderr)
        sys.exit(STOPPED)
