"""`python -m expvl.synthesis [render|text|vqa|all] [--config FILE ...] [key=value ...]`

Builds a dataset folder in three cached stages (`run`, also called by the embedded default):

    render  label records: SynthFACS faces (rendered into <out_dir>/render/) or a real-dataset
            reader (options `<source>.*`, train / val / test by `split.*`); <out_dir>/stages/labels/
    text    rule-based captions (+ LLM captions when text.llm.enabled); <out_dir>/stages/text/
    vqa     Q1 / Q2 / Q3 / emotion pairs; the final shards: <out_dir>/manifest.json + shards/
    all     everything (the default)

Each stage's output carries a hash of everything it depends on; a finished stage with the same
hash is skipped, a folder holding another config's output is refused before any work starts,
and an LLM run cut short (spend limit, --max-llm-calls) is marked incomplete and resumed by the
next run from the reply cache. LLM captions that fell back to the rule-based text are counted in
the summary; more than text.llm.max_fallback_share of them (default 0) is an error, and prompts
that got no valid reply are never cached, so the next run asks them again. Image paths in records
are relative to <out_dir>, or absolute inside source_root (the manifests' `image_roots`); a
reader record naming an image outside source_root is refused.

    python -m expvl.synthesis out_dir=data/tiny synthfacs.n_train=64 synthfacs.size=64
    python -m expvl.synthesis out_dir=data/bp4d source=bp4d source_root=/data/BP4D bp4d.frame_sampling=true \
        split.fold_protocol=bp4d split.test_fold=3 split.val_fraction=0.1
    OPENAI_API_KEY=... python -m expvl.synthesis text.llm.enabled=true text.llm.base_url=http://localhost:8000/v1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

from expvl.configs import load_config, save_config
from expvl.synthesis import text_rules
from expvl.synthesis.config import SynthesisConfig
from expvl.synthesis.llm_captions import add_llm_captions
from expvl.synthesis.llm_text import LLMTextClient
from expvl.synthesis.readers import READERS, folds
from expvl.synthesis.vqa import add_vqa, record_rng
from expvl.vocab.records import Record
from expvl.vocab.shards import (
    check_owner,
    config_hash,
    image_outside,
    is_complete,
    read_manifest,
    read_split_records,
    write_shards,
)

log = logging.getLogger("expvl.synthesis")
STAGES = ("render", "text", "vqa", "all")


@dataclasses.dataclass
class StageOutput:
    records: dict[str, list[Record]]  # split -> records
    hash: str
    skipped: bool  # True when a finished output with this hash was reused
    complete: bool = True  # False when the LLM stopped early (spend limit / call budget)
    extra: dict = dataclasses.field(default_factory=dict)  # manifest "extra" (LLM stats)


def stage_hashes(cfg: SynthesisConfig) -> dict[str, str]:
    """The hash of each stage's output; each includes the hash of the stage before it."""
    labels = config_hash({"stage": "labels", **cfg.source_fields()})
    text = config_hash({"stage": "text", "labels": labels, "seed": cfg.seed, "text": cfg.text.hashed_fields()})
    vqa = config_hash({"stage": "vqa", "text": text, "seed": cfg.seed, "vqa": dataclasses.asdict(cfg.vqa)})
    return {"labels": labels, "text": text, "vqa": vqa}


def stage_dirs(root: Path) -> dict[str, Path]:
    return {"labels": root / "stages" / "labels", "text": root / "stages" / "text", "vqa": root}


def load_labels(cfg: SynthesisConfig, root: Path) -> dict[str, list[Record]]:
    """Label-only records grouped by split, image paths relative to `root` (or absolute)."""
    if cfg.source == "synthfacs":
        from expvl.synthesis.synthfacs import render_dataset  # lazy: numpy / PIL only when rendering

        splits = render_dataset(cfg.synthfacs, root / "render")
        return {sp: [dataclasses.replace(r, image=f"render/{r.image}") for r in recs]
                for sp, recs in splits.items()}
    src = Path(cfg.source_root).resolve()
    records = list(READERS[cfg.source](src, cfg.reader_config()))
    undecided = [r for r in records if r.split == "all"]
    if cfg.split.enabled:
        if not undecided:
            raise ValueError(f"split.* is set, but {cfg.source} already puts every record in a split "
                             f"({sorted({r.split for r in records})})")
        split = folds.split_records(undecided, cfg.split, seed=cfg.seed)
        records = [r for r in records if r.split != "all"] + split.train + split.val + split.test
    elif undecided:
        log.warning("%d %s records have split 'all' (training reads 'train' and 'val'): set split.* "
                    "for a train / val / test split", len(undecided), cfg.source)
    out: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        outside = image_outside(r.image, src, [str(src)])
        if outside:  # the reader's label files name an image elsewhere: refuse it before anything is written
            raise ValueError(f"{cfg.source} record {r.id!r}: {outside}")
        image = r.image if Path(r.image).is_absolute() else str(src / r.image)
        out[r.split].append(dataclasses.replace(r, image=image))
    return dict(out)


def image_dirs(cfg: SynthesisConfig) -> list[str]:
    """Folders outside out_dir the records' images lie in (written as the manifests' `image_roots`)."""
    return [] if cfg.source == "synthfacs" else [str(Path(cfg.source_root).resolve())]


def run_labels(cfg: SynthesisConfig, root: Path, h: str) -> StageOutput:
    d = stage_dirs(root)["labels"]
    if is_complete(d, h):
        return StageOutput(read_split_records(d), h, skipped=True)
    records = load_labels(cfg, root)
    write_shards(d, records, cfg_hash=h, seed=cfg.seed, shard_size=cfg.shard_size, image_root="../..",
                 image_roots=image_dirs(cfg))
    return StageOutput(records, h, skipped=False)


def run_text(cfg: SynthesisConfig, root: Path, labels: StageOutput, h: str, *,
             max_llm_calls: int | None = None) -> StageOutput:
    d = stage_dirs(root)["text"]
    if is_complete(d, h):
        return StageOutput(read_split_records(d), h, skipped=True, extra=read_manifest(d)["extra"])
    records = {sp: [dataclasses.replace(r, captions={}, vqa=[]) for r in recs]
               for sp, recs in labels.records.items()}
    for recs in records.values():
        for r in recs:
            rng = record_rng(cfg.seed, r.id, "text")
            # a compound expression (RAF-DB compound) is described by its two emotions
            emotion = r.emotion if r.emotion is not None else r.meta.get("emotions")
            r.captions = text_rules.rule_captions(r.aus, emotion, rng, intensities=r.intensities,
                                                  regions=cfg.text.regions)
    extra, complete = {}, True
    if cfg.text.llm.enabled:
        llm = cfg.text.llm
        client = LLMTextClient(llm, llm.cache_dir or root / "llm_cache")
        every = [r for recs in records.values() for r in recs]
        stats = add_llm_captions(every, client, max_calls=max_llm_calls)
        extra["llm"] = dataclasses.asdict(stats)
        complete = stats.complete
        if stats.fallbacks:
            log.warning("%d of %d LLM requests fell back to the rule-based text (within "
                        "text.llm.max_fallback_share=%s)%s", stats.fallbacks, stats.requests, llm.max_fallback_share,
                        f"; {stats.failed} got no valid reply: the output is marked incomplete and a rerun "
                        "asks them again" if stats.failed else "")
    write_shards(d, records, cfg_hash=h, seed=cfg.seed, shard_size=cfg.shard_size, image_root="../..",
                 image_roots=image_dirs(cfg), extra=extra, complete=complete)
    return StageOutput(records, h, skipped=False, complete=complete, extra=extra)


def run_vqa(cfg: SynthesisConfig, root: Path, text: StageOutput, h: str) -> StageOutput:
    if is_complete(root, h):
        return StageOutput(read_split_records(root), h, skipped=True)
    records = {sp: [add_vqa(dataclasses.replace(r, captions=dict(r.captions)), cfg.vqa, seed=cfg.seed)
                    for r in recs] for sp, recs in text.records.items()}
    write_shards(root, records, cfg_hash=h, seed=cfg.seed, shard_size=cfg.shard_size, image_root=".",
                 image_roots=image_dirs(cfg), extra={**text.extra, "stage_hashes": stage_hashes(cfg)}, complete=text.complete)
    return StageOutput(records, h, skipped=False, complete=text.complete)


def run(cfg: SynthesisConfig, stage: str = "all", *, max_llm_calls: int | None = None,
        contact_sheet: bool = False) -> dict:
    """Run the pipeline up to `stage`; return a summary (hashes, counts, skipped stages, LLM stats)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    cfg.validate()  # also when called from Python with a config built by hand
    root = Path(cfg.out_dir)
    hashes, dirs = stage_hashes(cfg), stage_dirs(root)
    upto = {"render": ["labels"], "text": ["labels", "text"]}.get(stage, ["labels", "text", "vqa"])
    for name in upto:  # refuse another config's output before doing any work
        check_owner(dirs[name], hashes[name])
    if cfg.text.llm.enabled and "text" in upto:
        LLMTextClient(cfg.text.llm, root / "llm_cache").check_key()
    summary: dict = {"out_dir": str(root), "hashes": {k: hashes[k] for k in upto}, "skipped": []}
    out = run_labels(cfg, root, hashes["labels"])
    summary["skipped"] += ["labels"] if out.skipped else []
    if "text" in upto:
        out = run_text(cfg, root, out, hashes["text"], max_llm_calls=max_llm_calls)
        summary["skipped"] += ["text"] if out.skipped else []
        summary["llm"] = out.extra.get("llm")
        if "vqa" in upto:
            out = run_vqa(cfg, root, out, hashes["vqa"])
            summary["skipped"] += ["vqa"] if out.skipped else []
            save_config(cfg, root / "synthesis_config.yaml")
    summary["complete"] = out.complete
    summary["records"] = {sp: len(recs) for sp, recs in out.records.items()}
    if contact_sheet:
        from expvl.synthesis.synthfacs import contact_sheet as draw_sheet

        first = next(iter(out.records.values()), [])
        summary["contact_sheet"] = str(draw_sheet(first, root, root / "contact_sheet.png"))
    return summary


def main(argv: list[str] | None = None) -> dict:
    """The command line: parse, build, print the summary (errors in the data or config are raised)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = argv.pop(0) if argv and argv[0] in STAGES else "all"
    parser = argparse.ArgumentParser(prog="python -m expvl.synthesis", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", default=[], help="YAML file(s), merged in order")
    parser.add_argument("--contact-sheet", action="store_true", help="write <out_dir>/contact_sheet.png")
    parser.add_argument("--max-llm-calls", type=int, default=None, help="stop issuing LLM calls after N")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. synthfacs.n_train=64")
    args = parser.parse_args(argv)
    cfg = load_config(SynthesisConfig, args.config, args.overrides)
    summary = run(cfg, stage, max_llm_calls=args.max_llm_calls, contact_sheet=args.contact_sheet)
    print(json.dumps(summary, indent=1, sort_keys=True))
    return summary

