"""The Python API: `expvl.load` gives a ready model; it answers, captions and explains face images.

    import expvl

    model = expvl.load("runs/default")                       # a run folder train.py wrote
    model.ask("face.jpg", "Are the inner brows raised?")     # -> "yes"
    model.ask(["a.jpg", "b.jpg"], "Which emotion does this face show?")       # one answer per face
    model.ask(image, ["Are the lip corners pulled up?", "Is the nose wrinkled?"])  # image encoded once

`load` takes any run folder (the embedded default, a `mode: stage` recipe run, a VL-FAU run) or a
transformers InstructBlip / Blip2 folder (training/runs.py `open_run` opens all of them), and builds
its model with its tokenizers and image transform. Images are PIL images or paths, alone or in lists;
each distinct image goes through the encoder once, however many questions it is asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from expvl.datamodules.images import load_image, to_rgb
from expvl.evaluation.answerer import Answerer
from expvl.models.vision import VisionConfig
from expvl.training.run_folder import RunKindError
from expvl.training.runs import TransformersFolder, VLFAURun, open_run

ImageLike = Image.Image | str | Path


def load(path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None, part: str = "",
         vision: VisionConfig | None = None) -> ExpressionModel:
    """A trained model, ready for questions.

    Args:
        path: a run folder (config.yaml) or a transformers InstructBlip / Blip2 folder (config.json).
        device: where BLIP-2 models run: "cpu", "cuda", "cuda:1" or "auto" (VL-FAU runs on the CPU).
        dtype: the LLM weights' dtype for a transformers folder (e.g. torch.float16 on a GPU); None keeps
            the stored one.
        part: which model of a VL-FAU run with folds ("fold1", ...; default: main, else the first fold).
        vision: the image encoder of a transformers folder whose tower is not EVA ViT-g/14.
    """
    return ExpressionModel(open_run(path, device=device, dtype=dtype, vision=vision), part=part)


class ExpressionModel:
    """A loaded run: `ask` (stage 3, or a Blip2 folder), `caption` (stage 2), `explain` (VL-FAU), and the
    pieces behind them: `transform` (PIL image -> model input), `tokenizers`, `device`."""

    def __init__(self, run, *, part: str = ""):
        self.run = run
        self.vlfau = isinstance(run, VLFAURun)
        self.part = part
        self.device = getattr(run, "device", torch.device("cpu"))

    def __repr__(self) -> str:
        what = "VL-FAU" if self.vlfau else ", ".join(s for s in ("pretrain", "caption", "instruct") if self.run.trains(s))
        return f"ExpressionModel({str(self.run.dir)!r}: {what})"

    @property
    def transform(self):
        """The encoder's evaluation transform: a PIL image -> a (3, S, S) tensor."""
        return self.run.encoder.eval_transform

    @property
    def tokenizers(self) -> dict:
        return {"llm": self.run.tokenizer} if self.vlfau else self.run.tokenizers

    # ---- questions and captions (BLIP-2 family) ---------------------------------------------------

    def ask(self, images: ImageLike | Sequence[ImageLike], questions: str | Sequence[str], *,
            max_new_tokens: int = 60, num_beams: int = 1) -> str | list[str]:
        """Answer questions about faces. One image and one question give one answer (a str); a list of
        images with one question, one image with a list of questions, or two lists of the same length
        (pairwise) give a list of answers."""
        # a transformers Blip2 folder is asked through BLIP-2's VQA prompt; our own stage-2 models only
        # ever saw an empty prompt, so questions need a stage-3 model
        stage = "caption" if isinstance(self.run, TransformersFolder) and self.run.stage == "caption" else "instruct"
        answerer = self._answerer(stage, "ask")
        embeds, qs, single = self._pairs(answerer.model, images, questions)
        out = answerer.generate(embeds, qs, max_new_tokens=max_new_tokens, num_beams=num_beams)
        return out[0] if single else out

    def yes_probability(self, images: ImageLike | Sequence[ImageLike], questions: str | Sequence[str]
                        ) -> float | list[float]:
        """p("yes") / (p("yes") + p("no")) for yes/no questions (how evaluation decides Q3 AU questions),
        paired as in `ask`."""
        answerer = self._answerer("instruct", "score yes/no questions")
        embeds, qs, single = self._pairs(answerer.model, images, questions)
        p = torch.sigmoid(answerer.score_yes_no(embeds, qs)).tolist()
        return p[0] if single else p

    def caption(self, images: ImageLike | Sequence[ImageLike], *, max_new_tokens: int = 60,
                num_beams: int = 1) -> str | list[str]:
        """Describe faces as stage 2 (Exp-BLIP's captioning) was trained to."""
        answerer = self._answerer("caption", "caption")
        imgs, single = _as_list(images)
        out = answerer.caption(self._embeds(answerer.model, imgs), max_new_tokens=max_new_tokens, num_beams=num_beams)
        return out[0] if single else out

    # ---- explanations (VL-FAU) ----------------------------------------------------------------------

    def explain(self, images: ImageLike | Sequence[ImageLike]) -> dict | list[dict]:
        """VL-FAU: per-AU probabilities, the predicted AUs, a sentence per predicted AU, a whole-face
        description, and how well the words agree with the prediction."""
        if not self.vlfau:
            raise RunKindError(f"{self.run.dir} is not a VL-FAU run: explain needs one (train.py --config vlfau_*); "
                               "ask a BLIP-2 run questions instead")
        model = self.run.model(self.part)
        imgs, single = _as_list(images)
        with torch.no_grad():
            embeds = model.encode_image(torch.stack([self.transform(_image(i)) for i in imgs]))
            out = [asdict(e) for e in model.explain(embeds, self.run.tokenizer)]
        return out[0] if single else out

    # ---- plumbing -------------------------------------------------------------------------------------

    def _answerer(self, stage: str, what: str) -> Answerer:
        if self.vlfau:
            raise RunKindError(f"{self.run.dir} is a VL-FAU run: it can explain, not {what}")
        if not self.run.trains(stage):
            have = [s for s in ("pretrain", "caption", "instruct") if self.run.trains(s)]
            raise ValueError(f"{self.run.dir} has no {stage!r} model to {what} with (it trained {have})")
        return Answerer(self.run.stage_model(stage), self.run.tokenizers, self.run.text, self.device)

    @torch.no_grad()
    def _embeds(self, model, images: list) -> torch.Tensor:
        """(B, N, D) image embeddings after ln_vision, each image through the encoder once."""
        pixels = torch.stack([self.transform(_image(i)) for i in images]).to(self.device)
        return model.encode_image(pixels)

    def _pairs(self, model, images, questions) -> tuple[torch.Tensor, list[str], bool]:
        imgs, one_image = _as_list(images)
        # not a str nor a list of them (an int): refused below by type, not by `list(5)` failing
        qs, one_question = _as_list(questions, str) if isinstance(questions, Iterable) else ([questions], True)
        bad = [q for q in qs if not isinstance(q, str)]
        if bad:
            raise TypeError(f"a question is a string (or give a list of them), got {type(bad[0]).__name__} "
                            f"{bad[0]!r}")
        if one_image:
            index = [0] * len(qs)
        elif one_question:
            index, qs = list(range(len(imgs))), qs * len(imgs)
        elif len(imgs) == len(qs):
            index = list(range(len(imgs)))
        else:
            raise ValueError(f"{len(imgs)} images and {len(qs)} questions: give one of either, or as many of each")
        if any(not q.strip() for q in qs):
            raise ValueError("empty question: ask something")
        embeds = self._embeds(model, imgs)
        return embeds[torch.tensor(index, device=embeds.device)], qs, one_image and one_question


def _as_list(x, single_type=(Image.Image, str, Path)) -> tuple[list, bool]:
    if isinstance(x, single_type):
        return [x], True
    items = list(x)
    if not items:
        raise ValueError("nothing given: pass an image / question, or a non-empty list")
    return items, False


def _image(x: ImageLike) -> Image.Image:
    return to_rgb(x) if isinstance(x, Image.Image) else load_image(x)
