"""A trained stage-3 (Exp-VQA / InstructBLIP) model answering questions about faces.

eval.py asks it every evaluation question and `python eval.py ask` one question about one image.
The question reaches the model as in training (datamodules/collate.py InstructCollate): to the
Q-Former as the instruction (cut from the left at `text.max_qformer_len`) and to the LLM through
`text.prompt_template`; the prompts are padded on the left so every row's answer starts at the same
position.
"""

from __future__ import annotations

import torch

from models.generation import GenerationConfig


class Answerer:
    """A trained stage-3 model with its tokenizers and image pipeline: image(s) + question -> answer."""

    def __init__(self, run):
        self.run = run
        self.model = run.stage_model("instruct")
        self.qtok, self.tok = run.tokenizers["qformer"], run.tokenizers["llm"]
        self.template = run.cfg.text.prompt_template

    def _inputs(self, questions: list[str]):
        qf = self.qtok.batch_encode(questions, max_length=self.run.cfg.text.max_qformer_len, truncation_side="left")
        pr = self.tok.batch_encode([self.template.format(q) for q in questions], bos=True, padding_side="left")
        return ({k: v.to(self.run.device) for k, v in qf.items()},  # where the model runs (LoadedRun.device)
                {k: v.to(self.run.device) for k, v in pr.items()})

    @torch.no_grad()
    def score_yes_no(self, image_embeds: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """log p(yes) - log p(no) per row: (B,)."""
        qf, pr = self._inputs(questions)
        cands = [self.tok.encode("yes", bos=False, eos=True), self.tok.encode("no", bos=False, eos=True)]
        s = self.model.score_answers(image_embeds, pr["input_ids"], pr["attention_mask"], cands,
                                     instruction_ids=qf["input_ids"], instruction_mask=qf["attention_mask"])
        return (s[:, 0] - s[:, 1]).cpu()

    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor, questions: list[str], *, max_new_tokens: int = 40,
                 num_beams: int = 1) -> list[str]:
        qf, pr = self._inputs(questions)
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, eos_token_id=self.tok.eos_id,
                               pad_token_id=self.tok.pad_id)
        ids = self.model.generate(image_embeds, pr["input_ids"], pr["attention_mask"], cfg,
                                  instruction_ids=qf["input_ids"], instruction_mask=qf["attention_mask"])
        return [self.tok.decode(row).strip() for row in ids]
