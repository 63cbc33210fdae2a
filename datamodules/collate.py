"""Per-stage samples and collation: which text each stage trains on, tokenized and masked.

Record -> samples (`expand`, deterministic, run inside the stream):
- `caption_samples(kinds)`: one sample per named caption of the record (stage 1 and stage 2;
  AU-BLIP = au_rule + au_llm, Emot-BLIP = emotion, Exp-BLIP = fused, Mix/Cat = data options).
- `vqa_samples(types)`: one sample per VQA pair (stage 3, Exp-VQA).
Both refuse a kind the record schema does not have (`check_choices`, also run on the config at load
time), so a misspelt kind is an error, not a stage that trains on less data or none.

Samples -> batch (the collators, picklable for DataLoader workers):
- `PretrainCollate`  Q-Former text "[CLS] caption [SEP]" right-padded, plus integer keys of the
  caption text and emotion label so stage 1 can treat identical captions / same labels as positives.
- `CaptionCollate`   BLIP-2 OPT-style captioning with an empty prompt: "[BOS] caption [EOS]"; every
  non-pad token is a target, BOS included (LAVIS `blip2_opt.py`: it is predicted from the last query).
  [EOS] is the tokenizer's EOS id, or the one token of `TextConfig.caption_eos` (BLIP-2 OPT: "\n").
- `InstructCollate`  InstructBLIP: the instruction goes to the Q-Former and, through `prompt_template`,
  to the LLM; the LLM sequence is [BOS instruction | answer EOS | pad] (the answer's own BOS dropped,
  `concat_text_input_output`), and only answer + EOS are targets.

Images come either as transformed tensors ("images") or, for a frozen encoder, as cached features
("features", see datamodules/features.py). Fixes on purpose: the official code cuts text at
`max_txt_len` 32 tokens (read from a config section no Exp-BLIP yaml sets) and its caption processor
lower-cases text and cuts it at 50 words; here lengths are configurable (default 128/256 tokens) and
text is neither lower-cased nor cut at 50 words.
"""

from __future__ import annotations

import difflib
import zlib
from dataclasses import dataclass

import torch

from expvl.datamodules.features import FeatureStore
from expvl.datamodules.stream import collate_records
from expvl.models.tokenizer import QFormerTokenizer, SPTokenizer
from expvl.vocab.facs import EMOTIONS, REGIONS
from expvl.vocab.records import CAPTION_KINDS, VQA_TYPES, Record

# What a stage may ask for: the record schema's kinds (vocab/records.py), plus the Q2 regional
# descriptions, which records carry under "region:<name>".
CAPTION_CHOICES = CAPTION_KINDS + tuple(f"region:{r}" for r in REGIONS)
VQA_CHOICES = VQA_TYPES

# Caption kinds only an optional synthesis step writes -> (the kind every record it writes one for
# already has, the step). A record with the first but not the second means the step did not run, and
# the stage would quietly train on the other kinds only (expblip_stage1's AU-BLIP on au_rule alone).
# An error while the stream indexes the data, not a warning: a warning scrolls past in a multi-GPU log
# while a different model trains for days; dropping the kind from the stage's list is the explicit
# way to train without it. VQA types switched off in synthesis (vqa.q1: false, ...) leave no trace
# on a record, so they are not checked here.
OPTIONAL_CAPTIONS = {
    "au_llm": ("au_rule", "the LLM caption step of synthesis (python -m expvl.synthesis text.llm.enabled=true)"),
}


def check_choices(values: list[str], allowed: tuple[str, ...], *, key: str) -> list[str]:
    """`values` as a list, or a ValueError naming `key`, the unknown value, the closest allowed one and all."""
    for v in values:
        if v not in allowed:
            close = difflib.get_close_matches(str(v), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{key}: unknown value {v!r}{hint}; allowed: {', '.join(allowed)}")
    return list(values)


@dataclass
class TextConfig:
    max_qformer_len: int = 128  # Q-Former text tokens (captions in stage 1, instructions in stage 3)
    max_input_len: int = 128  # LLM instruction tokens (InstructBLIP max_txt_len); truncated on the left
    max_output_len: int = 256  # LLM caption / answer tokens (InstructBLIP max_output_txt_len)
    prompt_template: str = "{}"  # LLM prompt around the question (InstructBLIP: the question as is)
    caption_eos: str = ""  # what ends a caption, stage 2: "" = the LLM tokenizer's EOS id (LLaMA family);
    #   otherwise this text, which must be one token, is appended to every training caption in place of
    #   that id and is the token caption generation stops at. BLIP-2 OPT / Exp-BLIP: "\n" (LAVIS blip2_opt
    #   trains on caption + "\n" and generates with "\n" as EOS; OPT's own EOS `</s>` stays the tokenizer's)


def caption_end_id(tok, text: TextConfig) -> int | None:
    """The id `text.caption_eos` encodes to (None when it is "": the tokenizer's EOS ends captions);
    a text that is not exactly one token of this tokenizer is refused, naming its ids."""
    if not text.caption_eos:
        return None
    ids = tok.encode(text.caption_eos, bos=False)
    if len(ids) != 1:
        raise ValueError(f"text.caption_eos {text.caption_eos!r} is {len(ids)} tokens {ids} of the LLM tokenizer; "
                         "it must be exactly one")
    return ids[0]


class caption_samples:  # noqa: N801 - used like a function, a class so that workers can pickle it
    """Record -> [{"text", "kind"}] for each caption kind the record has, in `kinds` order."""

    def __init__(self, kinds: list[str]):
        self.kinds = check_choices(kinds, CAPTION_CHOICES, key="caption kinds")
        self.optional = {k: OPTIONAL_CAPTIONS[k] for k in self.kinds if k in OPTIONAL_CAPTIONS}

    def __call__(self, record: Record) -> list[dict]:
        for kind, (base, step) in self.optional.items():
            if kind not in record.captions and base in record.captions:
                raise ValueError(f"record {record.id!r} has caption {base!r} but not {kind!r}: {kind!r} comes "
                                 f"from {step}, and it did not run on this data. Run it, or drop {kind!r} "
                                 "from the stage's captions")
        return [{"text": record.captions[k], "kind": k} for k in self.kinds if k in record.captions]


class vqa_samples:  # noqa: N801
    """Record -> [{"question", "answer", "type", "au"}] for the record's VQA pairs of `types`."""

    def __init__(self, types: list[str]):
        self.types = check_choices(types, VQA_CHOICES, key="VQA types")

    def __call__(self, record: Record) -> list[dict]:
        return [{"question": p.question, "answer": p.answer, "type": p.type, "au": p.au}
                for p in record.vqa if p.type in self.types]


def text_key(text: str) -> int:
    """A stable integer per caption text (equal texts, equal keys), for stage-1 positives."""
    return zlib.crc32(text.encode("utf-8"))


def label_key(record: Record) -> int:
    return EMOTIONS.index(record.emotion) if record.emotion is not None else -1


class VisualInput:
    """Shared part: stack images, or look cached features up by record id."""

    def __init__(self, features: FeatureStore | None):
        self.features = features

    def visual(self, batch: dict) -> dict:
        if self.features is not None:
            return {"features": self.features.lookup([r.id for r in batch["records"]])}
        if batch["images"] is None:
            raise ValueError("batch has neither images nor a feature store to look features up in")
        return {"images": batch["images"]}


class PretrainCollate(VisualInput):
    def __init__(self, qformer_tokenizer: QFormerTokenizer, text: TextConfig, features: FeatureStore | None = None):
        super().__init__(features)
        self.tok, self.text = qformer_tokenizer, text

    def __call__(self, items: list[dict]) -> dict:
        batch = collate_records(items)
        texts = [s["text"] for s in batch["samples"]]
        enc = self.tok.batch_encode(texts, max_length=self.text.max_qformer_len)
        return {**self.visual(batch), "qf_ids": enc["input_ids"], "qf_mask": enc["attention_mask"],
                "text_key": torch.tensor([text_key(t) for t in texts]),
                "label_key": torch.tensor([label_key(r) for r in batch["records"]]),
                "texts": texts, "records": batch["records"], "_pos": batch["_pos"]}


class CaptionCollate(VisualInput):
    def __init__(self, llm_tokenizer: SPTokenizer, text: TextConfig, features: FeatureStore | None = None):
        super().__init__(features)
        self.tok, self.text = llm_tokenizer, text
        self.end_id = caption_end_id(llm_tokenizer, text)  # None: the tokenizer's EOS id ends a caption

    def __call__(self, items: list[dict]) -> dict:
        batch = collate_records(items)
        texts = [s["text"] for s in batch["samples"]]
        if self.end_id is None:
            enc = self.tok.batch_encode(texts, max_length=self.text.max_output_len, bos=True, eos=True,
                                        padding_side="right", truncation_side="right")
        else:  # BLIP-2 OPT: the text caption + caption_eos, tokenized together (LAVIS `t + "\n"`)
            ended = [t + self.text.caption_eos for t in texts]
            enc = self.tok.batch_encode(ended, max_length=self.text.max_output_len, bos=True,
                                        padding_side="right", truncation_side="right")
            _keep_last(enc, self.end_id)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {**self.visual(batch), "llm_ids": enc["input_ids"], "llm_mask": enc["attention_mask"],
                "labels": labels, "texts": texts, "records": batch["records"], "_pos": batch["_pos"]}


def _keep_last(enc: dict[str, torch.Tensor], end_id: int) -> None:
    """Right-padded rows cut at max_length lose their end token: put it back in each row's last real
    position, as the tokenizer's EOS survives truncation (in place)."""
    last = enc["attention_mask"].sum(1) - 1
    rows = torch.arange(last.shape[0])
    enc["input_ids"][rows, last] = end_id


class InstructCollate(VisualInput):
    def __init__(self, qformer_tokenizer: QFormerTokenizer, llm_tokenizer: SPTokenizer, text: TextConfig,
                 features: FeatureStore | None = None):
        super().__init__(features)
        self.qtok, self.tok, self.text = qformer_tokenizer, llm_tokenizer, text

    def __call__(self, items: list[dict]) -> dict:
        batch = collate_records(items)
        questions = [s["question"] for s in batch["samples"]]
        answers = [s["answer"] for s in batch["samples"]]
        qf = self.qtok.batch_encode(questions, max_length=self.text.max_qformer_len, truncation_side="left")
        llm = build_instruct_sequences(self.tok, [self.text.prompt_template.format(q) for q in questions], answers,
                                       max_input_len=self.text.max_input_len,
                                       max_output_len=self.text.max_output_len)
        return {**self.visual(batch), "qf_ids": qf["input_ids"], "qf_mask": qf["attention_mask"], **llm,
                "samples": batch["samples"], "records": batch["records"], "_pos": batch["_pos"]}


def build_instruct_sequences(tok: SPTokenizer, prompts: list[str], answers: list[str], *, max_input_len: int,
                             max_output_len: int) -> dict[str, torch.Tensor]:
    """[BOS prompt | answer EOS | pad] per row, labels -100 except on answer + EOS (right padded)."""
    rows, targets = [], []
    for p, a in zip(prompts, answers):
        inp = tok.encode(p, bos=True)
        if len(inp) > max_input_len:  # InstructBLIP truncates the instruction on the left, keeping BOS
            head = [] if tok.bos_id is None else [tok.bos_id]  # a model without BOS (Qwen) has none to keep
            inp = head + inp[len(inp) - max_input_len + len(head):]
        out = tok.encode(a, bos=False, eos=True)[:max_output_len]
        rows.append(inp + out)
        targets.append([-100] * len(inp) + out)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, :len(t)] = torch.tensor(t)
    return {"llm_ids": ids, "llm_mask": mask, "labels": labels}
