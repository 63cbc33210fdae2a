"""The run configuration of `train.py` / `eval.py`: one typed tree, every field documented.

Module configs live beside their modules (VisionConfig in models/vision.py, QFormerConfig in
models/qformer.py, LLMConfig in models/llm.py, OptimConfig in models/optim.py, DataConfig in
datamodules/datamodule.py, SynthesisConfig in synthesis/config.py); this file only composes them.
Defaults here are the embedded default (`configs/default.yaml` documents and may override them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from expvl.configs import MissingSetting
from expvl.datamodules.collate import CAPTION_CHOICES, VQA_CHOICES, TextConfig, check_choices
from expvl.datamodules.datamodule import DataConfig
from expvl.models.blip2 import STAGES
from expvl.models.llm import LLMConfig
from expvl.models.lora import LoRAConfig
from expvl.models.losses import LOSS_NORMS
from expvl.models.optim import OptimConfig
from expvl.models.qformer import QFormerConfig
from expvl.models.vision import VisionConfig
from expvl.models.vlfau import VLFAUConfig
from expvl.synthesis.config import SynthesisConfig


def at_least(key: str, value, minimum: int, why: str = "") -> None:
    """A count the schema needs of at least `minimum` (steps, batch sizes, intervals): refused at load time,
    naming the key, rather than training forever (-1), writing an untrained stage as finished (0) or
    dividing by zero inside Lightning."""
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum}{why}, got {value}")


def _tiny_qformer() -> QFormerConfig:
    # 2 post-LN layers of width 128, both cross-attending, 8 queries; vocab_size and pad id are
    # replaced by the trained tokenizer's. No dropout: on CPU the Bernoulli masks cost a sizeable share
    # of a step, and every step sees freshly sampled caption/question variants anyway.
    return QFormerConfig(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256, cross_attention_freq=1,
                         num_query_tokens=8, max_position_embeddings=256, encoder_width=256, vocab_size=1000,
                         hidden_dropout=0.0, attention_dropout=0.0)


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig.from_name("tiny-conv"))
    qformer: QFormerConfig = field(default_factory=_tiny_qformer)
    embed_dim: int = 128  # ITC projection width (BLIP-2: 256)
    image_position: str = "auto"  # 2-D sin-cos code on the image tokens after ln_vision (models/position_code.py
    #   image_position_code): auto = only for towers without position embeddings (the tiny conv tower; ViT
    #   recipes are unchanged) | sincos2d | none. The default's Q3 AU detection is better with it


@dataclass
class BootstrapConfig:
    """The stand-ins for downloaded weights that the offline default trains first (training/bootstrap.py)."""
    llm: LLMConfig = field(default_factory=lambda: LLMConfig(
        vocab_size=1000, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=384, max_seq_len=512))
    llm_vocab_size: int = 1000  # SentencePiece vocabulary of the LLM tokenizer
    qformer_vocab_size: int = 1000  # SentencePiece vocabulary of the Q-Former tokenizer
    llm_steps: int = 400  # optimizer steps of causal-LM training on the synthesized text
    llm_batch_size: int = 32
    llm_max_len: int = 96  # tokens per training text
    llm_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, min_lr=1e-4, warmup_steps=50,
                                                                       warmup_lr=0.0, weight_decay=0.01))
    encoder_steps: int = 800  # optimizer steps of supervised AU + emotion training of the image tower
    encoder_batch_size: int = 64
    encoder_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, min_lr=1e-4, warmup_steps=50,
                                                                           warmup_lr=0.0, weight_decay=0.05))

    def check(self) -> None:
        for name in ("llm_steps", "encoder_steps", "llm_batch_size", "encoder_batch_size", "llm_max_len"):
            at_least(f"bootstrap.{name}", getattr(self, name), 1)


@dataclass
class StageConfig:
    max_steps: int = 300  # optimizer steps
    batch_size: int = 32  # per device
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=30,
                                                                   warmup_lr=0.0))
    captions: list[str] = field(default_factory=list)  # caption kinds trained on (stages 1 and 2), from
    #   datamodules/collate.py CAPTION_CHOICES: au_rule | au_paper | au_llm | emotion | fused | cat | region:<name>
    vqa_types: list[str] = field(default_factory=list)  # VQA pair types trained on (stage 3): q1 | q2 | q3 | emotion
    label_positives: bool = True  # stage 1: same-emotion pairs are not ITC/ITM negatives (our fix)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # stages 2/3: LoRA adapters on the frozen LLM
    #   (models/lora.py); rank 0 = none
    loss_norm: str = "batch"  # stages 2/3, how the LM loss averages answer tokens (training/lit_blip2.py
    #   LitLanguage): batch = token mean per batch (the papers) | sample = per-sequence means, so long
    #   Q1/Q2 answers do not outweigh one-word Q3 / emotion answers | running = token sum / running mean
    #   of tokens per batch, which keeps mixed-batch weights under group_by_length
    group_by_length: int = 0  # k > 0: batches of similar text length (windows of k batches sorted by
    #   length, batches shuffled; datamodules/stream.py). Padding then follows each batch's own texts:
    #   stage 3 (one-word Q3 answers next to long Q1 descriptions) runs faster. With loss_norm "batch"
    #   it also shifts the loss mix (a per-token mean within a batch: long answers lose the share of the
    #   gradient their tokens had in mixed batches); "running" keeps it

    def check(self, name: str) -> None:
        at_least(f"{name}.max_steps", self.max_steps, 1, " (a stage of no steps would be saved as finished, untrained)")
        at_least(f"{name}.batch_size", self.batch_size, 1)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: Any = 1  # per node: an int, a list of ids, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # "ddp" for multi-GPU / multi-node
    precision: str = "32-true"  # Lightning's: 32-true | bf16-mixed | 16-mixed | bf16-true | ... ; "auto" =
    #   bf16-mixed where the hardware runs bf16 products (CUDA with bf16; a CPU with AMX-BF16 or AVX512-BF16
    #   whose measured bf16 step at the Q-Former's width is faster) and 32-true elsewhere: training/run_folder.py
    #   resolves it and logs what it picked and why
    log_every_n_steps: int = 25  # training steps between rows of <step>/logs/version_<n>/metrics.csv
    ckpt_every_n_steps: int = 100  # last.ckpt is refreshed this often (resume point)
    val_check_interval: int = 200  # training batches between validation runs
    limit_val_batches: int = 4  # validation batches per run
    progress_bar: bool = True
    accumulate_grad_batches: int = 1  # batches per optimizer step: the global batch is
    #   batch_size x devices x num_nodes x this; max_steps counts optimizer steps
    max_time: str | None = None  # wall-clock budget of each training step per invocation, "DD:HH:MM:SS"; a
    #   stage cut short by it saves last.ckpt, is not marked finished, and train.py exits with code 3:
    #   rerun the same command to resume
    gradient_clip_val: float | None = None  # None = each stage's optim.grad_clip; a number = this, for all
    gradient_clip_algorithm: str = "norm"  # norm | value
    logger: str = "csv"  # csv (<step>/logs/version_<n>/metrics.csv) | tensorboard | wandb (offline, files under
    #   <step>/logs/wandb; `wandb sync` uploads later) | none
    callbacks: list[Any] = field(default_factory=list)  # extra Lightning callbacks: "package.module.Class"
    #   (built without arguments) or {class_path: "package.module.Class", init_args: {...}}
    deterministic: bool = False  # Lightning's deterministic mode (torch.use_deterministic_algorithms)

    LOGGERS: ClassVar[tuple[str, ...]] = ("csv", "tensorboard", "wandb", "none")
    PRECISIONS: ClassVar[tuple[str, ...]] = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true",
                                             "64-true", "transformer-engine", "transformer-engine-float16",
                                             "32", "16", "bf16", "64")  # the last four: Lightning's aliases

    def check(self) -> None:
        """What Lightning would refuse later, refused at load time naming the key."""
        if str(self.precision) not in self.PRECISIONS:
            raise ValueError(f"trainer.precision must be one of {', '.join(self.PRECISIONS)}, got {self.precision!r}")
        if self.accumulate_grad_batches < 1:
            raise ValueError(f"trainer.accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}")
        for name in ("val_check_interval", "log_every_n_steps", "ckpt_every_n_steps", "num_nodes"):
            at_least(f"trainer.{name}", getattr(self, name), 1)
        at_least("trainer.limit_val_batches", self.limit_val_batches, 0)
        if self.max_time is not None and not re.fullmatch(r"\d+:\d{2}:\d{2}:\d{2}", self.max_time):
            raise ValueError(f"trainer.max_time must be DD:HH:MM:SS (e.g. 00:12:00:00), got {self.max_time!r}")
        if self.gradient_clip_val is not None and self.gradient_clip_val <= 0:
            raise ValueError(f"trainer.gradient_clip_val must be > 0 (or null), got {self.gradient_clip_val}")
        if self.gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"trainer.gradient_clip_algorithm must be norm or value, got {self.gradient_clip_algorithm!r}")
        if self.logger not in self.LOGGERS:
            raise ValueError(f"trainer.logger must be one of {self.LOGGERS}, got {self.logger!r}")
        for i, cb in enumerate(self.callbacks):
            path = cb.get("class_path") if isinstance(cb, dict) else cb
            if not isinstance(path, str) or "." not in path or (isinstance(cb, dict) and set(cb) - {"class_path",
                                                                                                    "init_args"}):
                raise ValueError(f"trainer.callbacks[{i}] must be 'package.module.Class' or {{class_path: ..., "
                                 f"init_args: {{...}}}}, got {cb!r}")


@dataclass
class EvalConfig:
    split: str = "test"  # held-out identities
    limit: int = 0  # evaluate at most this many records (0 = all)
    batch_size: int = 64

    def check(self) -> None:
        at_least("eval.limit", self.limit, 0, " (0 = all records)")
        at_least("eval.batch_size", self.batch_size, 1)


@dataclass
class PretrainedConfig:
    """Local files of the real parts, for `mode: stage` (nothing is ever downloaded)."""
    llm: str = ""  # Hugging Face LLaMA folder: config.json + *.safetensors or pytorch_model*.bin
    llm_dtype: str = "fp16"  # dtype of the frozen LLM's weights: fp32 | fp16 | bf16
    llm_tokenizer: str = ""  # that LLM's tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face, LLaMA-3)
    llm_convention: str = "llama"  # llama | instructblip-vicuna (</s> as BOS/EOS/UNK, [PAD] = 32000)
    qformer_vocab: str = ""  # bert-base-uncased vocab.txt for the Q-Former tokenizer ([DEC] appended)
    lavis_checkpoint: str = ""  # LAVIS BLIP-2 / InstructBLIP .pth: Q-Former, query tokens, ln_vision, projections
    hf_checkpoint: str = ""  # transformers Blip2 / InstructBlip folder or file: the same parts, in its names
    init_checkpoints: list[str] = field(default_factory=list)  # our stage checkpoints, applied in order


@dataclass
class RunConfig:
    run_dir: str = "runs/default"  # every step's output goes under this folder
    seed: int = 0
    system: str = "blip2"  # which schema train.py / eval.py read: blip2 (this one) | vlfau (VLFAURecipe)
    mode: str = "pipeline"  # pipeline: the embedded default, every step | stage: one stage on data.root
    stage: str = "instruct"  # with mode=stage: pretrain | caption | instruct
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=lambda: TextConfig(prompt_template="Question: {} Answer:"))
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(captions=["au_rule", "emotion", "fused"]))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(captions=["fused"]))
    stage3: StageConfig = field(default_factory=lambda: StageConfig(vqa_types=["q1", "q2", "q3", "emotion"]))
    eval: EvalConfig = field(default_factory=EvalConfig)
    random_init: list[str] = field(default_factory=list)  # mode=stage: parts allowed to start from random
    #   weights (vision | qformer); anything else without its weights file is an error

    @staticmethod
    def migrate(layer) -> list[str]:
        """Rewrite keys of older config files (a run folder's config.yaml) in place; say what changed."""
        notes = []
        for name in ("stage1", "stage2", "stage3"):
            stage = layer.get(name) or {}
            if "loss_per_sample" in stage:  # renamed 2026-11-23
                stage["loss_norm"] = "sample" if stage.pop("loss_per_sample") else "batch"
                notes.append(f"{name}.loss_per_sample -> {name}.loss_norm={stage['loss_norm']}")
        return notes

    def validate(self) -> None:
        self.trainer.check()
        self.bootstrap.check()
        self.eval.check()
        if self.mode not in ("pipeline", "stage"):
            raise ValueError(f"mode must be 'pipeline' or 'stage', got {self.mode!r}")
        if self.stage not in STAGES:  # the model's stages, each a row of training/stages.py STAGES
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.data.stream.group_by_length:
            raise ValueError("data.stream.group_by_length is set per stage here: use stage1/stage2/stage3."
                             "group_by_length (the encoder bootstrap streams whole records, which have no length)")
        for name in ("stage1", "stage2", "stage3"):
            getattr(self, name).check(name)
            # what collate's caption_samples / vqa_samples accept, checked before any step runs
            check_choices(getattr(self, name).captions, CAPTION_CHOICES, key=f"{name}.captions")
            check_choices(getattr(self, name).vqa_types, VQA_CHOICES, key=f"{name}.vqa_types")
            if getattr(self, name).group_by_length < 0:
                raise ValueError(f"{name}.group_by_length must be >= 0 (0 = off)")
            if getattr(self, name).loss_norm not in LOSS_NORMS:
                raise ValueError(f"{name}.loss_norm is {getattr(self, name).loss_norm!r}: use one of {LOSS_NORMS}")
            # LoRA (models/lora.py): stage 1 has no LLM to adapt; the embedded default's stages read cached
            # encoder features, which adapters in the encoder would not change
            getattr(self, name).lora.check(f"{name}.lora", has_llm=name != "stage1", sees_images=self.mode == "stage")
        if self.mode == "stage":
            self._check_recipe_parts()

    def _check_recipe_parts(self) -> None:
        """mode=stage reads every part from a local path: an empty one is an error, and so is a frozen part
        (or the Q-Former) that would start from random weights unless `random_init` names it."""
        if not self.data.root:
            raise MissingSetting("data.root", "mode=stage needs data.root (a dataset folder written by "
                                 "`python -m expvl.synthesis`)")
        if not self.pretrained.qformer_vocab:
            raise MissingSetting("pretrained.qformer_vocab", "mode=stage needs pretrained.qformer_vocab "
                                 "(bert-base-uncased vocab.txt)")
        if self.stage != "pretrain":
            for key in ("llm", "llm_tokenizer"):
                if not getattr(self.pretrained, key):
                    raise MissingSetting(f"pretrained.{key}", f"stage {self.stage!r} needs pretrained.llm and "
                                         "pretrained.llm_tokenizer")
        if self.pretrained.lavis_checkpoint and self.pretrained.hf_checkpoint:
            raise ValueError("pretrained.lavis_checkpoint and pretrained.hf_checkpoint both give the Q-Former: "
                             "set one")
        unknown = sorted(set(self.random_init) - set(RANDOM_INIT))
        if unknown:
            raise ValueError(f"random_init: {unknown} are not parts; use {list(RANDOM_INIT)}")
        if self.model.vision.freeze and not self.model.vision.pretrained and "vision" not in self.random_init:
            raise MissingSetting("model.vision.pretrained", "the frozen image encoder would start from random "
                                 "weights: name its weights file, or add 'vision' to random_init to mean it")
        p = self.pretrained
        if not (p.lavis_checkpoint or p.hf_checkpoint or p.init_checkpoints) and "qformer" not in self.random_init:
            raise MissingSetting("pretrained.lavis_checkpoint", "the Q-Former would start from random weights: "
                                 "name pretrained.lavis_checkpoint, pretrained.hf_checkpoint or "
                                 "pretrained.init_checkpoints, or add 'qformer' to random_init to mean it")


@dataclass
class VLFAURecipe:
    """configs/vlfau_*.yaml: VL-FAU (models/vlfau.py) trained and evaluated by training/vlfau.py."""
    system: str = "vlfau"  # selects this schema in train.py / eval.py
    run_dir: str = "runs/vlfau"
    seed: int = 0
    parts_from: str = ""  # a BLIP-2 run config (e.g. "default") whose bootstrap steps supply the data, the
    #   frozen encoder, the LLM and its tokenizer: run there, or reused when that run already has them.
    #   "" = real parts: data.root, model.vision.pretrained, llm, llm_tokenizer below
    llm: str = ""  # Hugging Face LLaMA folder of the language model; "" = a fresh decoder (needs
    #   model.train_language_model=true: the paper's lightweight language module)
    llm_tokenizer: str = ""  # tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face) of that model
    qformer_checkpoint: str = ""  # a LAVIS BLIP-2 checkpoint (e.g. stage 1), or a transformers Blip2 folder /
    #   .safetensors: its Q-Former (the 32 general queries) and ln_vision (transformers: the vision
    #   post_layernorm) initialise the model's; "" = random. The per-AU queries always start fresh.
    model: VLFAUConfig = field(default_factory=VLFAUConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=30,
                                                                   warmup_lr=0.0))
    max_steps: int = 300  # optimizer steps (per fold)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    fold_protocol: str = ""  # "" = the dataset's own train / val / test splits; "bp4d" | "disfa" = the
    #   subject-exclusive 3-fold protocol of synthesis/readers/folds.py; or a fold file (JSON) path
    test_folds: list[int] = field(default_factory=list)  # folds held out in turn, 1-based (1, 2, 3)
    pos_weight_from_train: bool = True  # fill model.pos_weight from the training split's label frequencies
    explain: int = 8  # faces whose explanations (local + global descriptions) go into the report

    def validate(self) -> None:
        self.trainer.check()
        at_least("max_steps", self.max_steps, 1, " (a part of no steps would be saved as finished, untrained)")
        at_least("explain", self.explain, 0)
        if self.system != "vlfau":
            raise ValueError(f"a VL-FAU recipe has system: vlfau, got {self.system!r}")
        if bool(self.fold_protocol) != bool(self.test_folds):
            raise ValueError("fold_protocol and test_folds go together: set both (folds) or neither")
        check_choices([self.model.global_caption], CAPTION_CHOICES, key="model.global_caption")
        if any(k < 1 for k in self.test_folds):
            raise ValueError(f"test_folds are 1-based (fold 1 = the first subject part), got {self.test_folds}")
        if not self.parts_from and not self.data.root:
            raise ValueError("set parts_from (e.g. default) or data.root: VL-FAU needs records to train on")
        if not self.parts_from and not self.llm_tokenizer:
            raise ValueError("without parts_from, llm_tokenizer must name the language model's tokenizer.model")
        if not self.parts_from and not self.model.vision.pretrained:
            raise ValueError("without parts_from, model.vision.pretrained must name the image encoder's weights "
                             "file (configs/vlfau_bp4d.yaml: EVA_VIT_G)")
        if not self.llm and not self.parts_from and not self.model.train_language_model:
            raise ValueError("no llm folder and model.train_language_model=false: a frozen random decoder "
                             "cannot describe anything; give llm or train the decoder")


RANDOM_INIT = ("vision", "qformer")  # the parts `random_init` may name

SCHEMAS = {"blip2": RunConfig, "vlfau": VLFAURecipe}  # the `system` key of a config selects its schema
