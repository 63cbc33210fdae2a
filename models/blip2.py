"""The BLIP-2 composition: image encoder -> ln_vision -> Q-Former -> (heads | projection -> frozen LLM).

Phases follow the papers (BLIP-2 §3, InstructBLIP §2.2, Exp-BLIP §3, Exp-VQA); every step is checked
against LAVIS lavis/models/blip2_models/{blip2_qformer.py, blip2_opt.py, blip2_vicuna_instruct.py}:

- `encode_image`     ViT tokens of a chosen layer, then the trainable `ln_vision` (B, N, Dv)
- `stage1_losses`    ITC + ITM (hard negatives) + ITG on the Q-Former (BLIP-2 stage 1)
- `soft_prompt`      Q query outputs projected to the LLM width (B, Q, d); with `instruction_ids`
                     the instruction enters the Q-Former too (InstructBLIP / Exp-VQA)
- `lm_loss`          frozen-LLM loss on [soft prompt | prompt | answer], -100 on everything but
                     the answer (stage 2 captioning with an empty prompt, stage 3 VQA)
- `generate`, `score_answers`  free generation and candidate scoring (yes/no AU questions)

Which parts exist depends on the stage (`Blip2Config.stage`): stage 1 builds the ITC/ITM heads and
the Q-Former LM head but no LLM; stage 2 builds a query-only Q-Former (as LAVIS `blip2_opt`);
stage 3 an instruction-aware one. Nothing is built and then deleted. The frozen LLM is either decoder
of models/generation.py `DECODERS` (the LLaMA family of models/llm.py, OPT of models/opt.py): the
composition uses only their shared interface, and `llm_proj` maps to the decoder's input width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from expvl.models.generation import (
    Decoder,
    DecoderConfig,
    GenerationConfig,
    build_decoder,
    generate,
    score_candidates,
)
from expvl.models.losses import itc_loss, itc_similarities, lm_loss, sample_hard_negatives
from expvl.models.position_code import IMAGE_POSITION, image_position_code
from expvl.models.qformer import QFormer, QFormerConfig
from expvl.models.vision import VisionConfig, VisionEncoder

STAGES = ("pretrain", "caption", "instruct")


@dataclass
class Blip2Config:
    stage: str = "pretrain"  # pretrain (stage 1) | caption (stage 2) | instruct (stage 3, Exp-VQA)
    vision: VisionConfig = field(default_factory=lambda: VisionConfig.from_name("tiny-conv"))
    qformer: QFormerConfig = field(default_factory=lambda: QFormerConfig.from_name("tiny"))
    llm: DecoderConfig | None = None  # the frozen decoder's config (LLMConfig or OPTConfig), required for
    #                                  caption / instruct
    embed_dim: int = 256  # ITC projection width (BLIP-2: 256)
    itc_label_smoothing: float = 0.1  # BLIP-2's value for ITC and ITG
    itg_label_smoothing: float = 0.1
    image_position: str = "auto"  # fixed 2-D sin-cos code added to the tokens after ln_vision: "auto" = only
    #                               when the tower's tokens carry no position (CNN maps; ViTs have their own,
    #                               so BLIP-2 recipes are unchanged) | "sincos2d" | "none"

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"Blip2Config.stage must be one of {STAGES}, got {self.stage!r}")
        if self.image_position not in IMAGE_POSITION:
            raise ValueError(f"Blip2Config.image_position must be one of {IMAGE_POSITION}, got {self.image_position!r}")
        if self.stage != "pretrain" and self.llm is None:
            raise ValueError(f"stage {self.stage!r} needs an LLM config (Blip2Config.llm)")

    @property
    def qformer_for_stage(self) -> QFormerConfig:
        """The Q-Former this stage builds: full + LM head (1), query-only (2), instruction-aware (3)."""
        return replace(self.qformer, text_input=self.stage != "caption", lm_head=self.stage == "pretrain")


GatherFn = Callable[[torch.Tensor, bool], torch.Tensor]  # (local (B, ...), with_grad) -> (W*B, ...)


def _no_gather(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    return x


class Blip2(nn.Module):
    def __init__(self, cfg: Blip2Config, *, vision: VisionEncoder | None = None, llm: Decoder | None = None):
        super().__init__()
        self.cfg = cfg
        self.vision = vision if vision is not None else VisionEncoder(cfg.vision)
        width = self.vision.width
        qcfg = replace(cfg.qformer_for_stage, encoder_width=width)
        self.ln_vision = nn.LayerNorm(width)
        # not saved in checkpoints (persistent=False): it is a function of the tower, rebuilt here
        self.register_buffer("image_pos", image_position_code(self.vision, cfg.image_position), persistent=False)
        self.qformer = QFormer(qcfg)
        D = qcfg.hidden_size
        if cfg.stage == "pretrain":
            self.vision_proj = nn.Linear(D, cfg.embed_dim)
            self.text_proj = nn.Linear(D, cfg.embed_dim)
            self.itm_head = nn.Linear(D, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
        else:
            self.llm = llm if llm is not None else build_decoder(cfg.llm)
            self.llm_proj = nn.Linear(D, self.llm.config.dim)  # to the decoder's input width

    # ---- image side ----------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> ln_vision(ViT tokens) [+ position code] (B, N, Dv)."""
        return self.embed_features(self.vision(images))

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Cached frozen-encoder tokens (B, N, Dv) -> ln_vision(tokens) [+ position code]; ln_vision trains."""
        x = self.ln_vision(features.float())
        return x if self.image_pos is None else x + self.image_pos

    # ---- stage 1: ITC + ITM + ITG ---------------------------------------------------------------

    def stage1_losses(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      *, dec_token_id: int, pad_token_id: int, positives: torch.Tensor | None = None,
                      gather: GatherFn = _no_gather, rank: int = 0,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """image_embeds (B, N, Dv); input_ids/attention_mask (B, T) Q-Former text starting with [CLS].

        `positives` (B, B_global) marks in-batch pairs that are not negatives (identical captions or
        same labels); `gather` concatenates a tensor over ranks (identity on one process).
        """
        B = image_embeds.shape[0]
        # ranks may pad their text to different lengths; ITM gathers texts, so pad to the global max
        T = int(gather(torch.tensor([input_ids.shape[1]], device=input_ids.device), False).max())
        input_ids = F.pad(input_ids, (0, T - input_ids.shape[1]), value=pad_token_id)
        attention_mask = F.pad(attention_mask, (0, T - attention_mask.shape[1]), value=0)
        q = self.qformer.encode_queries(image_embeds, use_cache=True)
        image_feats = F.normalize(self.vision_proj(q["hidden"]), dim=-1)  # (B, Q, E)
        text_hidden = self.qformer.encode_text(input_ids, attention_mask)["hidden"]
        text_feat = F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)  # (B, E) from [CLS]

        # ITC: features of other ranks carry no gradient, as in LAVIS's concat_all_gather
        sims = itc_similarities(image_feats, text_feat, gather(image_feats.detach(), False),
                                gather(text_feat.detach(), False), self.temp)
        loss_itc = itc_loss(sims["sim_i2t"], sims["sim_t2i"], rank_offset=rank * B, positives=positives,
                            label_smoothing=self.cfg.itc_label_smoothing)

        # ITM: one hard negative text per image and one hard negative image per text
        neg = sample_hard_negatives(sims["sim_i2t"], sims["sim_t2i"], rank_offset=rank * B,
                                    positives=positives, generator=generator)
        ids_all, mask_all = gather(input_ids, False), gather(attention_mask, False)
        embeds_all = gather(image_embeds, True)
        itm_ids = torch.cat([input_ids, input_ids, ids_all[neg["neg_text_for_image"]]])
        itm_mask = torch.cat([attention_mask, attention_mask, mask_all[neg["neg_text_for_image"]]])
        itm_images = torch.cat([image_embeds, embeds_all[neg["neg_image_for_text"]], image_embeds])
        mm = self.qformer.encode_multimodal(itm_ids, itm_mask, itm_images)
        itm_logits = self.itm_head(mm["query_hidden"]).mean(dim=1)  # (3B, 2)
        itm_labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(itm_logits.device)
        loss_itm = F.cross_entropy(itm_logits, itm_labels)

        # ITG: [DEC] replaces [CLS]; text decoded causally over the cached query K/V
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = dec_token_id
        labels = dec_ids.masked_fill(input_ids == pad_token_id, -100)
        logits = self.qformer.decode_text(dec_ids, attention_mask, q["cache"])["logits"]
        loss_itg = lm_loss(logits, labels, label_smoothing=self.cfg.itg_label_smoothing)

        return {"loss": loss_itc + loss_itm + loss_itg, "loss_itc": loss_itc, "loss_itm": loss_itm,
                "loss_itg": loss_itg, "itm_acc": (itm_logits.argmax(-1) == itm_labels).float().mean()}

    # ---- stages 2 and 3: the frozen LLM ------------------------------------------------------------

    def soft_prompt(self, image_embeds: torch.Tensor, instruction_ids: torch.Tensor | None = None,
                    instruction_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Q query outputs projected to the LLM width: (B, Q, d_llm).

        Stage 3 feeds the instruction to the Q-Former (bidirectional with the queries); stage 2 is
        queries only.
        """
        if self.cfg.stage == "instruct":
            if instruction_ids is None:
                raise ValueError("the instruction-aware Q-Former needs instruction_ids")
            hidden = self.qformer.encode_multimodal(instruction_ids, instruction_mask, image_embeds)["query_hidden"]
        else:
            hidden = self.qformer.encode_queries(image_embeds)["hidden"]
        return self.llm_proj(hidden)

    def lm_loss(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, *, instruction_ids: torch.Tensor | None = None,
                instruction_mask: torch.Tensor | None = None, per_sample: bool = False,
                tokens: float | None = None) -> dict[str, torch.Tensor]:
        """LLM loss on `labels` (B, T) (-100 = no loss) given the soft prompt and input_ids (B, T).

        per_sample / tokens: how the token losses are averaged (models.losses.lm_loss)."""
        prompt = self.soft_prompt(image_embeds, instruction_ids, instruction_mask)
        return {"loss": self.llm.prefixed_loss(prompt, input_ids, attention_mask, labels, per_sample=per_sample,
                                               tokens=tokens)}

    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 config: GenerationConfig, *, instruction_ids: torch.Tensor | None = None,
                 instruction_mask: torch.Tensor | None = None, decode=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """New token ids (B * num_return_sequences, L). Prompts are left-padded (B, Tp)."""
        prompt = self.soft_prompt(image_embeds, instruction_ids, instruction_mask)
        embeds, mask = self.llm.prefixed(prompt, prompt_ids, prompt_mask)
        # the soft prompt sits before the left padding; generation's positions come from the mask
        return generate(self.llm, inputs_embeds=embeds, attention_mask=mask, config=config, decode=decode,
                        generator=generator)["sequences"]

    @torch.no_grad()
    def score_answers(self, image_embeds: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      candidates: list[list[int]], *, instruction_ids: torch.Tensor | None = None,
                      instruction_mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p(candidate | image, prompt) for each candidate token list: (B, C)."""
        prompt = self.soft_prompt(image_embeds, instruction_ids, instruction_mask)
        embeds, mask = self.llm.prefixed(prompt, prompt_ids, prompt_mask)
        return score_candidates(self.llm, inputs_embeds=embeds, attention_mask=mask, candidates=candidates)
