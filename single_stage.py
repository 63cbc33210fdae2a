"""`train.py mode=stage`: one stage of a real recipe, every pretrained part read from local files.

The embedded default (pipeline.py) builds its own parts; here the user names them in
`pretrained.*` (configs/schema.py `PretrainedConfig`): a Hugging Face LLaMA folder and its
SentencePiece model, a bert-base-uncased vocab.txt for the Q-Former, optionally a LAVIS BLIP-2 /
InstructBLIP checkpoint or a transformers Blip2 / InstructBlip folder, and our own stage checkpoints.
The stage then trains through the same `run_stage` (resumable, trimmed final checkpoint) on the
records under `data.root`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from configs import save_config
from configs.schema import PretrainedConfig, RunConfig
from datamodules.collate import CaptionCollate, InstructCollate, PretrainCollate, caption_samples, vqa_samples
from datamodules.datamodule import StageDataModule
from models.blip2 import Blip2
from models.convert.eva import HF_LN_VISION
from models.convert.llama import load_hf_llama
from models.convert.stages import init_from_stage_checkpoints
from models.lit_blip2 import LitPretrain
from models.llm import LLaMA
from models.tokenizer import QFormerTokenizer, llm_tokenizer
from models.vision import VisionEncoder
from pipeline import (
    STAGE_DIRS,
    _replace,
    blip2_config,
    language_lit,
    run_stage,
    stage_data_config,
    stage_trainer,
)

log = logging.getLogger("single_stage")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_lavis_into(model: Blip2, path: str) -> None:
    """A LAVIS checkpoint's Q-Former (strict, models/convert/lavis.py) and the composition parts it has."""
    from models.convert.lavis import load_lavis_qformer

    parts = load_lavis_qformer(model.qformer, path)
    _copy_parts(model, parts, {"opt_proj.": "llm_proj."}, path)  # BLIP-2 OPT's name for the same projection


# transformers' names of the parts around the Q-Former -> ours (LAVIS's); stages 2 and 3 only (its
# Q-Former has no LM head for stage 1, so the ITC/ITM projections never load from it)
HF_PARTS = {"language_projection.": "llm_proj.", HF_LN_VISION: "ln_vision."}


def load_hf_into(model: Blip2, path: str) -> None:
    """A transformers Blip2 / InstructBlip folder's (or file's) Q-Former and query tokens (strict,
    models/convert/hf_blip2.py), its `post_layernorm` as ln_vision and its language projection. Its ViT loads
    through `model.vision.pretrained` and its LLaMA through `pretrained.llm`, given the same path."""
    from models.convert.hf_blip2 import load_hf_qformer_file

    _copy_parts(model, load_hf_qformer_file(model.qformer, path), HF_PARTS, path)


def _copy_parts(model: Blip2, parts: dict, rename: dict[str, str], path: str) -> None:
    """Copy the composition parts a checkpoint has (renamed by prefix) into the model's, shape-checked;
    a part the model's stage has no place for (a stage-1 head in a stage-2 model) is skipped and logged."""
    from models.convert import CheckpointError

    ours = model.state_dict()
    with torch.no_grad():
        for key, t in parts.items():
            dst = next((new + key[len(old):] for old, new in rename.items() if key.startswith(old)), key)
            if dst not in ours:
                log.info("%s: %s has no place in a %s model, not loaded", path, key, model.cfg.stage)
                continue
            if tuple(t.shape) != tuple(ours[dst].shape):
                raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, "
                                      f"{dst} wants {tuple(ours[dst].shape)}")
            ours[dst].copy_(t)


def resize_vocab(llm: LLaMA, vocab_size: int) -> LLaMA:
    """Append rows to the embeddings (and head) as InstructBLIP does for Vicuna's [PAD] (32000 -> 32001).

    New rows are the mean of the existing ones; [PAD] is never attended to nor predicted. Only the
    (vocab, dim) matrices are replaced, in place, in their dtype and device: rebuilding the model
    would cost a second 7B LLaMA in host memory. A tied head is the embedding matrix
    (models/llm.py: `lm_head` is None) and stays tied.
    """
    old = llm.config.vocab_size
    if vocab_size == old:
        return llm
    if vocab_size < old:
        raise ValueError(f"tokenizer vocab ({vocab_size}) is smaller than the LLM's ({old})")
    embed, head = llm.model.embed_tokens, llm.lm_head
    shared = head is not None and head.weight is embed.weight  # a head tied by sharing the Parameter
    embed.weight = _grown(embed.weight, vocab_size)
    embed.num_embeddings = vocab_size
    if head is not None:
        head.weight = embed.weight if shared else _grown(head.weight, vocab_size)
        head.out_features = vocab_size
    llm.config = _replace(llm.config, vocab_size=vocab_size)
    return llm


def _grown(weight: torch.nn.Parameter, rows: int) -> torch.nn.Parameter:
    """(vocab, dim) -> (rows, dim): the old rows, then their mean (taken in fp32) in every new one."""
    with torch.no_grad():
        grown = weight.new_empty((rows, weight.shape[1]))
        grown[:weight.shape[0]].copy_(weight)
        grown[weight.shape[0]:].copy_(weight.float().mean(0, keepdim=True).to(weight.dtype))
    return torch.nn.Parameter(grown, requires_grad=weight.requires_grad)


@dataclass
class StageParts:
    """What `train.py mode=stage` builds before it trains: tokenizers, frozen LLM, encoder, model."""
    tokenizers: dict  # "qformer", and "llm" for stages 2 and 3
    encoder: VisionEncoder  # model.vision: cfg.model.vision with its own `pretrained` weights
    llm: LLaMA | None  # None for stage 1; its vocabulary grown to its tokenizer's (resize_vocab)
    model: Blip2  # the stage's model, its own parts freshly initialised (no lavis / init checkpoints yet)


def build_stage_parts(cfg: RunConfig) -> StageParts:
    """The stage's model as training builds it, from the local files in `cfg.pretrained` and
    `cfg.model.vision`; evaluation (stage_run.py) builds the same and loads the stage's final.ckpt."""
    p = cfg.pretrained
    toks = {"qformer": QFormerTokenizer.from_bert_vocab(p.qformer_vocab)}
    llm = None
    if cfg.stage != "pretrain":
        toks["llm"] = llm_tokenizer(p.llm_tokenizer, convention=p.llm_convention)
        llm = resize_vocab(load_hf_llama(p.llm, dtype=_DTYPES[p.llm_dtype]), toks["llm"].vocab_size).eval()
    encoder = VisionEncoder(cfg.model.vision)
    model = Blip2(blip2_config(cfg, cfg.stage, toks, llm), vision=encoder, llm=llm)
    return StageParts(tokenizers=toks, encoder=encoder, llm=llm, model=model)


def init_stage_weights(model: Blip2, p: PretrainedConfig) -> None:
    """The starting weights a recipe names: a LAVIS or a transformers checkpoint, then our own stage
    checkpoints."""
    if p.lavis_checkpoint:
        load_lavis_into(model, p.lavis_checkpoint)
    if p.hf_checkpoint:
        load_hf_into(model, p.hf_checkpoint)
    if p.init_checkpoints:
        # each file gives what its own stage trained: a stage-1 checkpoint the Q-Former and
        # ln_vision, leaving a stage-2/3 model's llm_proj fresh (models/convert/stages.py)
        init_from_stage_checkpoints(model, p.init_checkpoints)


def run_single_stage(cfg: RunConfig) -> dict:
    """One stage of a real recipe: tokenizers, encoder, LLM and initial weights from local files.

    Under DDP every rank runs all of this; only global rank 0 writes into the run folder (run_stage).
    """
    run_dir = Path(cfg.run_dir)
    st = {"pretrain": cfg.stage1, "caption": cfg.stage2, "instruct": cfg.stage3}[cfg.stage]
    tr = stage_trainer(cfg, STAGE_DIRS[cfg.stage], st)
    if tr.is_global_zero:
        save_config(cfg, run_dir / "config.yaml")
    parts = build_stage_parts(cfg)
    init_stage_weights(parts.model, cfg.pretrained)
    model, encoder, toks, qtok = parts.model, parts.encoder, parts.tokenizers, parts.tokenizers["qformer"]
    if cfg.stage == "pretrain":
        collate, expand = PretrainCollate(qtok, cfg.text), caption_samples(st.captions)
        factory = lambda m: LitPretrain(m, optim=st.optim, total_steps=st.max_steps, dec_token_id=qtok.dec_id,
                                        pad_token_id=qtok.pad_id, label_positives=st.label_positives)
    elif cfg.stage == "caption":
        collate, expand = CaptionCollate(toks["llm"], cfg.text), caption_samples(st.captions)
        factory = language_lit(st)
    else:
        collate, expand = InstructCollate(qtok, toks["llm"], cfg.text), vqa_samples(st.vqa_types)
        factory = language_lit(st)
    data = StageDataModule(stage_data_config(cfg, st, cfg.data.root), expand=expand, collate=collate,
                           transform=encoder.train_transform, val_transform=encoder.eval_transform)
    final = run_stage(cfg, STAGE_DIRS[cfg.stage], model=model, lit_factory=factory, data=data, stage=st,
                      inputs={"config": asdict(cfg)}, tr=tr)
    return {"run_dir": str(run_dir), "checkpoint": str(final)}
