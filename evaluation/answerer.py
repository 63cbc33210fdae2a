"""A trained BLIP-2 model answering questions about faces: the one way questions reach a model.

Evaluation asks it every question (vqa.py) and the Python API (expvl.load) its user's. The question
reaches the model as in training (datamodules/collate.py InstructCollate): to an instruction-aware
Q-Former (stage 3) as the instruction, cut from the left at `text.max_qformer_len`, and to the LLM
through `text.prompt_template`; the prompts are padded on the left so every row's answer starts at
the same position. A query-only model (stage 2, a transformers Blip2 folder) sees the question in the
LLM prompt only; with no question at all it writes a caption from the soft prompt and BOS, as stage 2
was trained, ending where `text.caption_eos` says (the tokenizer's EOS, or BLIP-2 OPT's "\n").
"""

from __future__ import annotations

import torch

from expvl.datamodules.collate import TextConfig, caption_end_id
from expvl.models.blip2 import Blip2
from expvl.models.generation import GenerationConfig


class Answerer:
    """A model with its tokenizers ("llm", and "qformer" for an instruction-aware one) and text settings:
    image embeddings + questions -> answers, yes/no margins, captions."""

    def __init__(self, model: Blip2, tokenizers: dict, text: TextConfig, device: torch.device | str = "cpu"):
        self.model, self.text, self.device = model, text, torch.device(device)
        self.tok = tokenizers["llm"]
        self.instructed = model.cfg.stage == "instruct"
        self.qtok = tokenizers["qformer"] if self.instructed else None
        # what ends a caption: the tokenizer's EOS, or text.caption_eos (BLIP-2 OPT's "\n")
        end = caption_end_id(self.tok, text)
        self.caption_eos = [self.tok.eos_id] if end is None else [end]
        # a query-only model was trained on captions alone: its answers to questions end as its captions
        # do too (BLIP-2 OPT's VQA stops at "\n" as well)
        self.answer_eos = [self.tok.eos_id] + ([end] if end is not None and not self.instructed else [])

    def _inputs(self, prompts: list[str], questions: list[str]) -> dict:
        """The LLM prompt ids and, for an instruction-aware model, the instruction ids, on the model's device."""
        pr = self.tok.batch_encode(prompts, bos=True, padding_side="left")
        out = {"input_ids": pr["input_ids"].to(self.device), "attention_mask": pr["attention_mask"].to(self.device)}
        if self.instructed:
            qf = self.qtok.batch_encode(questions, max_length=self.text.max_qformer_len, truncation_side="left")
            out.update(instruction_ids=qf["input_ids"].to(self.device),
                       instruction_mask=qf["attention_mask"].to(self.device))
        return out

    def _questions(self, questions: list[str]) -> dict:
        return self._inputs([self.text.prompt_template.format(q) for q in questions], questions)

    @torch.no_grad()
    def score_yes_no(self, image_embeds: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """log p(yes) - log p(no) per row: (B,)."""
        x = self._questions(questions)
        cands = [self.tok.encode("yes", bos=False, eos=True), self.tok.encode("no", bos=False, eos=True)]
        s = self.model.score_answers(image_embeds, x.pop("input_ids"), x.pop("attention_mask"), cands, **x)
        return (s[:, 0] - s[:, 1]).cpu()

    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor, questions: list[str], *, max_new_tokens: int = 40,
                 num_beams: int = 1) -> list[str]:
        return self._generate(image_embeds, self._questions(questions), max_new_tokens, num_beams,
                              self.answer_eos)

    @torch.no_grad()
    def caption(self, image_embeds: torch.Tensor, *, max_new_tokens: int = 60, num_beams: int = 1) -> list[str]:
        """A description from the soft prompt and BOS alone (stage 2's captioning)."""
        if self.instructed:
            raise ValueError("an instruction-aware (stage-3) model answers questions; caption with a stage-2 "
                             "model, or ask it to describe the face")
        B = image_embeds.shape[0]
        return self._generate(image_embeds, self._inputs([""] * B, [""] * B), max_new_tokens, num_beams,
                              self.caption_eos)

    def _generate(self, image_embeds, x: dict, max_new_tokens: int, num_beams: int,
                  eos: list[int]) -> list[str]:
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, eos_token_id=eos,
                               pad_token_id=self.tok.pad_id)
        ids = self.model.generate(image_embeds, x.pop("input_ids"), x.pop("attention_mask"), cfg, **x)
        return [self.tok.decode(row).strip() for row in ids]
