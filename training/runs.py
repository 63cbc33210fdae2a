"""A finished run opened again: one loader, `open_run`, for every layout train.py writes, and for a
transformers InstructBlip / Blip2 folder.

    open_run(path) -> Blip2Run    a BLIP-2 run (config `system: blip2`), either layout:
                                    mode: pipeline  the embedded default; every part under the folder
                                                    (tokenizers/, llm/hf, encoder/, stage1-3/final.ckpt)
                                    mode: stage     one stage of a real recipe; config.yaml and
                                                    <stage folder>/final.ckpt, every other part read
                                                    from the local paths its config names
                   -> VLFAURun    a VL-FAU run (`system: vlfau`): its `main` part or one model per fold
                   -> TransformersFolder   a transformers InstructBlip (our stage 3) or Blip2 (stage 2) folder

Models are built by the same code as in training (the stage table's `build_stage_model`, or
single_stage.py `build_stage_parts` + `init_stage_weights` for a recipe stage, whose init checkpoint
may hand on an encoder it fine-tuned), then each `final.ckpt` is loaded strictly: exactly the tensors
its stage trained, each of its shape. Everything is loaded lazily, on the device the run was opened
for; a stage that has not finished raises, naming the missing checkpoint.

Evaluation (expvl.evaluation) is handed an opened run and reads only what `Blip2Run` / `VLFAURun`
expose; the Python API (expvl.load) wraps one.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from expvl.configs import config_system, load_config
from expvl.configs.schema import RunConfig
from expvl.datamodules.collate import TextConfig
from expvl.datamodules.features import FeatureStore
from expvl.datamodules.images import load_image, resolve_image
from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.convert import load_hf_llm
from expvl.models.convert.blip2_parts import copy_parts, load_qformer_checkpoint
from expvl.models.convert.hf_blip2 import HF_STAGES, qformer_config_from_hf
from expvl.models.convert.hf_llm import hf_model_type
from expvl.models.generation import Decoder
from expvl.models.llm import LLaMA, fit_vocab
from expvl.models.tokenizer import QFormerTokenizer, SPTokenizer, llm_tokenizer
from expvl.models.vision import VisionConfig, VisionEncoder
from expvl.synthesis.config import SynthesisConfig
from expvl.training.bootstrap import frozen_encoder, step_features
from expvl.training.checkpoints import load_trained
from expvl.training.single_stage import StageParts, build_stage_parts, init_stage_weights
from expvl.training.stages import STAGES, build_stage_model, trainable
from expvl.training.vlfau import VLFAURun, open_vlfau_run


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when torch sees a GPU, else CPU) or a torch device name, refused when absent here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)  # an unknown name raises, naming it
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA device on this machine (use cpu or auto)")
    return device


def open_run(run_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             vision: VisionConfig | None = None) -> Blip2Run | VLFAURun | TransformersFolder:
    """The run in `run_dir`, whatever train.py wrote there (its config.yaml says which system and layout),
    or a transformers InstructBlip / Blip2 folder (its config.json; `dtype` and `vision` apply to it);
    BLIP-2 models run on `device` ("auto", "cpu", "cuda:1", ...), VL-FAU ones on the CPU."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    device = resolve_device(device) if isinstance(device, str) else device
    if not path.exists():
        if (run_dir / "config.json").exists():
            return TransformersFolder(run_dir, device=device, dtype=dtype, vision=vision)
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml) nor a transformers folder "
                                "(no config.json)")
    if config_system([path]) == "vlfau":
        return open_vlfau_run(run_dir)
    return Blip2Run(run_dir, load_config(RunConfig, [path]), device=device)


def data_heldout_aus(data_root: Path) -> list[str]:
    """The zero-shot AUs of a data folder: the `vqa.heldout_aus` it was synthesized with (a recipe run's
    own `synthesis` section describes no data: mode=stage reads data.root as it is)."""
    path = data_root / "synthesis_config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: data.root must be a folder written by `python -m expvl.synthesis`")
    return list(load_config(SynthesisConfig, [path]).vqa.heldout_aus)


class Blip2Run:
    """A BLIP-2 run folder of either layout: `cfg`, `data_root`, `tokenizers` ("qformer", "llm"), the
    `encoder`, the `llm`, the `features` cache, `stage_model(stage)`, `trains(stage)` (which stages this
    kind of run trains at all), `heldout_aus` (never asked in the training split's Q3: the zero-shot AUs),
    `meta` (report header lines) and the `device` its models run on (inputs go there through
    `image_embeds*`; cached features stay on the CPU)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, *, device: torch.device = torch.device("cpu")):
        self.dir, self.cfg, self.device = Path(run_dir), cfg, torch.device(device)
        self.recipe_stage = cfg.mode == "stage"
        if self.recipe_stage:
            self.stages = (cfg.stage,)
            self.data_root = Path(cfg.data.root)
            self.heldout_aus = data_heldout_aus(self.data_root)
            self.meta = {"run": f"mode: stage, stage: {cfg.stage}",
                         "checkpoint": str(self.checkpoint(cfg.stage)), "data": str(self.data_root)}
        else:
            self.stages = tuple(STAGES)  # the embedded default trains all three
            self.data_root = self.dir / "data"
            self.heldout_aus = list(cfg.synthesis.vqa.heldout_aus)  # its data step synthesized from this
            self.meta = {}
        self._tokenizers = self._encoder = self._llm = self._features = self._recipe = None
        self._models: dict[str, Blip2] = {}

    def trains(self, stage: str) -> bool:
        return stage in self.stages

    @property
    def text(self):
        return self.cfg.text

    def checkpoint(self, stage: str) -> Path:
        return self.dir / STAGES[stage].folder / "final.ckpt"

    def _finished(self, stage: str) -> Path:
        ckpt = self.checkpoint(stage)
        if not self.trains(stage):
            raise FileNotFoundError(f"{self.dir} trained stage {self.cfg.stage!r} only (mode: stage): it has no "
                                    f"{stage!r} model ({ckpt})")
        if not ckpt.exists():
            raise FileNotFoundError(f"{ckpt} not found: stage {stage!r} has not finished in this run")
        return ckpt

    # ---- the parts: the run's own bootstrap outputs, or a recipe's local files -----------------------

    @property
    def _recipe_parts(self) -> StageParts:
        """mode: stage: tokenizers, encoder, LLM and the one stage model, as single_stage.py built them."""
        if self._recipe is None:
            ckpt = self._finished(self.cfg.stage)
            parts = build_stage_parts(self.cfg)
            init_stage_weights(parts.model, self.cfg.pretrained)
            load_trained(parts.model, ckpt, trainable(parts.model), stage=self.cfg.stage)
            parts.model.to(self.device).eval()  # the encoder and LLM are its submodules
            self._recipe = parts
        return self._recipe

    @property
    def tokenizers(self) -> dict:
        if self.recipe_stage:
            return self._recipe_parts.tokenizers
        if self._tokenizers is None:
            tok_dir = self.dir / "tokenizers"
            self._tokenizers = {"llm": SPTokenizer(tok_dir / "llm.model"),
                                "qformer": QFormerTokenizer.from_sentencepiece(tok_dir / "qformer.model")}
        return self._tokenizers

    @property
    def encoder(self) -> VisionEncoder:
        if self.recipe_stage:
            return self._recipe_parts.encoder  # the model's own: trained weights when the stage trained it
        if self._encoder is None:
            # a real encoder named in the config replaced the stand-in (bootstrap.step_encoder)
            encoder_file = self.cfg.model.vision.pretrained or self.dir / "encoder" / "encoder.pt"
            self._encoder = frozen_encoder(self.cfg, encoder_file).to(self.device)
        return self._encoder

    @property
    def llm(self) -> LLaMA:
        if self.recipe_stage:
            if self._recipe_parts.llm is None:
                raise ValueError(f"{self.dir}: a stage {self.cfg.stage!r} run has no LLM")
            return self._recipe_parts.llm
        if self._llm is None:
            self._llm = load_hf_llm(self.dir / "llm" / "hf").eval()
        return self._llm

    @property
    def features(self) -> FeatureStore:
        """Encoder tokens of every split, cached under the run folder (keyed by the encoder's weights)."""
        if self._features is None:
            self._features = step_features(self.cfg, self.data_root, self.encoder, self.dir / "features")
        return self._features

    def stage_model(self, stage: str) -> Blip2:
        if self.recipe_stage:
            self._finished(stage)
            return self._recipe_parts.model
        if stage not in self._models:
            ckpt = self._finished(stage)
            llm = self.llm if STAGES[stage].needs_llm else None
            model = build_stage_model(self.cfg, stage, self.tokenizers, self.encoder, llm)
            load_trained(model, ckpt, trainable(model), stage=stage)
            self._models[stage] = model.to(self.device).eval()
        return self._models[stage]

    # ---- images -------------------------------------------------------------------------------------

    def image_embeds(self, model: Blip2, records) -> torch.Tensor:
        return model.embed_features(self.features.lookup([r.id for r in records]).to(self.device))

    def image(self, record):
        return load_image(resolve_image(record.image, self.data_root))

    def image_embeds_from_file(self, model: Blip2, path) -> torch.Tensor:
        pixels = self.encoder.eval_transform(load_image(path))[None].to(self.device)
        return model.encode_image(pixels)


# EVA ViT-g/14 as transformers stores BLIP-2's encoder: 39 blocks (the 40th is never read), 1408 wide
EVA_G_HF = {"hidden_size": 1408, "num_hidden_layers": 39, "num_attention_heads": 16, "intermediate_size": 6144,
            "patch_size": 14}


# a folder's language-model family (text_config.model_type) -> what ends its captions (TextConfig.caption_eos;
# "" = the tokenizer's EOS). BLIP-2 OPT trained and generates captions ending in "\n" (LAVIS blip2_opt), and
# transformers' conversion of it stores that token's id as text_config.eos_token_id (Salesforce/blip2-opt-*)
CAPTION_EOS = {"opt": "\n"}


class TransformersFolder:
    """A transformers InstructBlip / Blip2 folder (a local copy of e.g. Salesforce/instructblip-vicuna-7b or
    Salesforce/blip2-opt-2.7b) as a ready model: its ViT into our EVA tower, its Q-Former and projection,
    its language model (any family of models/convert/hf_llm.py: LLaMA-family, OPT) and tokenizers.

    InstructBlip is our stage 3 (the question enters the Q-Former; the LLM prompt is the question as
    is, as InstructBLIP was tuned); Blip2 is our stage 2 (query-only; questions through BLIP-2's
    "Question: {} Answer:" prompt, captions from the soft prompt and BOS alone, ending as `CAPTION_EOS`
    says for its family: BLIP-2 OPT's "\n"). The LLM tokenizer is the folder's tokenizer.json (specials
    from tokenizer_config.json; BLIP-2 OPT: `</s>` as BOS and EOS, `<pad>`), else its SentencePiece
    tokenizer.model (InstructBLIP-Vicuna's conventions for an InstructBlip folder); the Q-Former's the
    BERT vocabulary in qformer_tokenizer/vocab.txt. The decoder's vocabulary grows to a larger tokenizer's
    (InstructBLIP's [PAD]) and stays as it is for a smaller one (OPT pads 50265 tokens to 50272 rows).
    `vision` replaces the encoder config read off the folder (needed for towers other than EVA ViT-g).
    """

    def __init__(self, folder: Path, *, device: torch.device = torch.device("cpu"), dtype: torch.dtype | None = None,
                 vision: VisionConfig | None = None):
        self.dir, self.device = Path(folder), torch.device(device)
        config = json.loads((self.dir / "config.json").read_text())
        kind = config.get("model_type")
        if kind not in HF_STAGES:
            raise ValueError(f"{self.dir / 'config.json'}: model_type {kind!r} is not one of {sorted(HF_STAGES)}")
        self.stage = HF_STAGES[kind]
        self.stages = (self.stage,)
        self.cfg = None  # no run config: what evaluation would read is not here
        self.family = hf_model_type(self.dir)  # the language model's: text_config.model_type
        self.text = TextConfig(prompt_template="{}" if self.stage == "instruct" else "Question: {} Answer:",
                               caption_eos=CAPTION_EOS.get(self.family, ""))
        self.tokenizers = {"llm": self._llm_tokenizer()}
        if self.stage == "instruct":
            self.tokenizers["qformer"] = QFormerTokenizer.from_bert_vocab(self._file("qformer_tokenizer/vocab.txt"))
        llm = load_hf_llm(self.dir, dtype=dtype)
        n_tokens = self.tokenizers["llm"].vocab_size
        self.llm: Decoder = fit_vocab(llm, n_tokens).eval()
        self.encoder = VisionEncoder(replace(vision or self._vision(config), pretrained=str(self.dir)))
        qformer = qformer_config_from_hf(config)
        self.model = Blip2(Blip2Config(stage=self.stage, vision=self.encoder.config, qformer=qformer,
                                       llm=self.llm.config), vision=self.encoder, llm=self.llm)
        copy_parts(self.model, load_qformer_checkpoint(self.model.qformer, self.dir, "transformers"), self.dir)
        self.model.to(self.device).eval()

    def _file(self, name: str) -> Path:
        path = self.dir / name
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: the folder has no {name}")
        return path

    def _llm_tokenizer(self):
        if (self.dir / "tokenizer.json").exists():
            return llm_tokenizer(self.dir / "tokenizer.json")
        convention = "instructblip-vicuna" if self.stage == "instruct" else "llama"
        return llm_tokenizer(self._file("tokenizer.model"), convention=convention)

    def _vision(self, config: dict) -> VisionConfig:
        v = config["vision_config"]
        mismatch = {k: v.get(k) for k, want in EVA_G_HF.items() if v.get(k) != want}
        if mismatch:
            raise ValueError(f"{self.dir / 'config.json'}: vision_config {mismatch} is not EVA ViT-g/14 {EVA_G_HF}; "
                             "pass vision=VisionConfig(...) for this tower")
        return VisionConfig.from_name("eva-g", image_size=v.get("image_size", 224),
                                      precision="fp16" if self.device.type == "cuda" else "fp32")

    def trains(self, stage: str) -> bool:
        return stage == self.stage

    def stage_model(self, stage: str) -> Blip2:
        if stage != self.stage:
            raise ValueError(f"{self.dir} is a {self.stage!r} model (a transformers {'InstructBlip' if self.stage == 'instruct' else 'Blip2'} "
                             f"folder), not a {stage!r} one")
        return self.model

    def image_embeds_from_file(self, model: Blip2, path) -> torch.Tensor:
        pixels = self.encoder.eval_transform(load_image(path))[None].to(self.device)
        return model.encode_image(pixels)
