"""Tokenizers: SentencePiece for the LLM, WordPiece or SentencePiece for the Q-Former.

Checked against LAVIS `Blip2Base.init_tokenizer` (BLIP-2's Q-Former tokenizer: bert-base-uncased
+ `[DEC]` as bos, id 30522; [CLS]=101, [SEP]=102, [PAD]=0), LAVIS `blip2_vicuna_instruct.py`
(InstructBLIP-Vicuna: `</s>` is BOS, EOS and UNK, `[PAD]` appended as id 32000, vocab 32001; inputs
truncated on the left, outputs on the right) and, in tests, token for token against transformers'
pure-Python `BertTokenizerLegacy`.

- `SPTokenizer`: a LLaMA-family `tokenizer.model` under one of two id conventions ("llama": <unk>=0,
  <s>=1, </s>=2; "instructblip-vicuna": as above). `SPTokenizer.train` builds the tiny default's
  tokenizer from text with settings that round-trip exactly (byte fallback, no normalisation, digits
  split, whitespace kept), deterministic for a given input.
- `JSONTokenizer`: the same interface over a Hugging Face `tokenizer.json` (LLaMA-3's and Qwen's
  byte-level BPE), checked against transformers' `PreTrainedTokenizerFast` and `Qwen2Tokenizer`;
  `llm_tokenizer(path)` picks `SPTokenizer` or `JSONTokenizer` by the file. Mistral's
  `tokenizer.model` is an `SPTokenizer` under the "llama" convention (checked against transformers'
  `LlamaTokenizer` on text without leading whitespace, where transformers' conversion and
  SentencePiece agree).

BOS. `bos_id` is None for a model trained without one (Qwen: `"bos_token": null`); `encode(bos=True)`
and `batch_encode(bos=True)` then add nothing, as transformers does, so every caller asks for BOS
the same way whatever the model. The callers: `datamodules/collate.py` (`build_instruct_sequences`
keeps the BOS at the head of a left-truncated instruction, when there is one), the caption /
VL-FAU collates and `training/bootstrap.py` (`batch_encode(bos=True, eos=True)`), and
`evaluation/answerer.py` (the generation prompt, `batch_encode(bos=True)` left-padded): none needs a
BOS id of its own.
- `QFormerTokenizer`: [CLS] text [SEP] with `dec_id` for ITG. Backends: BERT WordPiece from a
  `vocab.txt` (the `tokenizers` library: BertNormalizer + BertPreTokenizer + WordPiece, the same
  pieces transformers uses; lower-cases like bert-base-uncased, which is right for that vocabulary;
  the official code also lower-cased the *LLM* text, a defect we do not copy), or a SentencePiece
  model trained on our text (the tiny default), cased.

Specials are added by ids, never by writing "</s>" into the text: SentencePiece does not parse
control symbols out of text. Truncation keeps the specials and cuts the text from the chosen side,
so a sequence never exceeds `max_length` (as transformers does).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Literal

import sentencepiece as spm
import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

Side = Literal["left", "right"]


def _require_file(path, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _pad_batch(bodies: list[list[int]], *, head: list[int], tail: list[int], pad_id: int,
               max_length: int | None, padding: str, padding_side: Side,
               truncation_side: Side) -> dict[str, torch.Tensor]:
    """head + body + tail per row, the body cut to fit `max_length`, padded to one length.

    Returns input_ids (B, T) and attention_mask (B, T), both int64 (1 = real token).
    """
    if not bodies:
        raise ValueError("batch_encode needs at least one text")
    if padding_side not in ("left", "right") or truncation_side not in ("left", "right"):
        raise ValueError(f"padding_side / truncation_side must be 'left' or 'right', "
                         f"got {padding_side!r} / {truncation_side!r}")
    if padding not in ("longest", "max_length") or (padding == "max_length" and max_length is None):
        raise ValueError(f"padding must be 'longest', or 'max_length' with max_length set; got {padding!r}")
    rows = []
    for body in bodies:
        if max_length is not None:
            room = max_length - len(head) - len(tail)
            if room < 0:
                raise ValueError(f"max_length={max_length} cannot hold the {len(head) + len(tail)} special tokens")
            if len(body) > room:
                body = body[:room] if truncation_side == "right" else body[len(body) - room:]
        rows.append(head + body + tail)
    T = max_length if padding == "max_length" else max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if padding_side == "right" else slice(T - len(r), T)
        input_ids[i, span] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _train_sentencepiece(texts: Sequence[str], out_path, *, vocab_size: int, model_type: str,
                         pieces: dict, user_symbols: Sequence[str] = (),
                         control_symbols: Sequence[str] = ()) -> str:
    """Train a SentencePiece model whose decode(encode(x)) == x for any text; deterministic bytes."""
    texts = list(texts)
    if not texts:
        raise ValueError("cannot train a tokenizer on no text")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True,                   # any character outside the vocabulary becomes UTF-8 bytes, never <unk>
        split_digits=True,                    # numbers tokenize digit by digit, as LLaMA
        normalization_rule_name="identity",   # no NFKC: full-width letters, ligatures etc. survive
        remove_extra_whitespaces=False,       # runs of spaces, leading/trailing spaces survive
        allow_whitespace_only_pieces=True,    # whitespace runs may be single pieces (LLaMA-2 does this)
        add_dummy_prefix=True,                # "▁" before the first word, removed again by decode
        character_coverage=1.0, hard_vocab_limit=False,  # vocab_size is an upper bound on tiny corpora
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,  # all text, fixed order: deterministic
        max_sentence_length=1 << 16, minloglevel=2,
        user_defined_symbols=list(user_symbols), control_symbols=list(control_symbols), **pieces)
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, out_path)  # atomic: a crashed run never leaves half a model
    return out_path


# ---------------------------------------------------------------------------------------------- LLM

class SPTokenizer:
    """SentencePiece tokenizer of the LLM, with the special-id convention of the checkpoint it serves."""

    def __init__(self, model_file, *, convention: Literal["llama", "instructblip-vicuna"] = "llama",
                 pad_id: int | None = None):
        self.model_file = _require_file(model_file, "SentencePiece tokenizer model")
        self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        self.convention = convention
        n = self.sp.get_piece_size()
        if convention == "llama":
            self.unk_id, self.bos_id, self.eos_id = self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()
            if self.bos_id < 0 or self.eos_id < 0:
                raise ValueError(f"{self.model_file}: the model has no BOS/EOS pieces (bos={self.bos_id}, "
                                 f"eos={self.eos_id}), so the 'llama' convention cannot hold")
            # a pad piece if the model has one, else <unk> (LLaMA has none; 0 never collides with EOS targets)
            self.pad_id = pad_id if pad_id is not None else (self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id)
            self.vocab_size = n
        elif convention == "instructblip-vicuna":
            if pad_id is not None:
                raise ValueError("the 'instructblip-vicuna' convention fixes pad_id (= appended [PAD]); do not pass it")
            eos = self.sp.piece_to_id("</s>")
            if self.sp.id_to_piece(eos) != "</s>":
                raise ValueError(f"{self.model_file}: no '</s>' piece, cannot apply the instructblip-vicuna convention")
            self.unk_id = self.bos_id = self.eos_id = eos   # LAVIS add_special_tokens(bos/eos/unk='</s>')
            self.pad_id = n                                  # '[PAD]' appended: 32000 for Vicuna
            self.vocab_size = n + 1                          # the LLM's embeddings are resized to this (32001)
        else:
            raise ValueError(f"unknown tokenizer convention {convention!r}; use 'llama' or 'instructblip-vicuna'")
        self._special = {self.bos_id, self.eos_id, self.unk_id, self.pad_id}
        self._special |= {i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Text of `ids` (list or 1-D tensor) with BOS/EOS/UNK/PAD and control ids skipped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        ids = [i for i in ids if i not in self._special]
        bad = [i for i in ids if not 0 <= i < self.sp.get_piece_size()]
        if bad:  # e.g. an LLM whose output layer is wider than the tokenizer
            raise ValueError(f"decode: ids {bad[:5]} are outside the tokenizer's {self.vocab_size} ids")
        return self.sp.decode(ids)

    def batch_encode(self, texts: Sequence[str], *, max_length: int | None = None, padding_side: Side = "right",
                     truncation_side: Side = "right", bos: bool = True, eos: bool = False,
                     padding: str = "longest") -> dict[str, torch.Tensor]:
        """texts -> {input_ids (B, T), attention_mask (B, T)}; BOS/EOS survive truncation."""
        return _pad_batch([self.sp.encode(t) for t in texts], head=[self.bos_id] * bos, tail=[self.eos_id] * eos,
                          pad_id=self.pad_id, max_length=max_length, padding=padding,
                          padding_side=padding_side, truncation_side=truncation_side)

    @classmethod
    def train(cls, texts: Sequence[str], out_path, vocab_size: int, *, model_type: str = "bpe",
              user_symbols: Sequence[str] = ()) -> SPTokenizer:
        """Train a LLaMA-style model (<unk>=0, <s>=1, </s>=2, <pad>=3) on `texts`, write it to out_path.

        `vocab_size` is an upper bound (a small corpus may give fewer pieces) and must be above ~300:
        the 256 byte-fallback pieces are always in the vocabulary.
        """
        _train_sentencepiece(texts, out_path, vocab_size=vocab_size, model_type=model_type,
                             user_symbols=user_symbols,
                             pieces={"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3, "unk_piece": "<unk>",
                                         "bos_piece": "<s>", "eos_piece": "</s>", "pad_piece": "<pad>"})
        return cls(out_path, convention="llama")


class JSONTokenizer:
    """The LLM's tokenizer from a Hugging Face `tokenizer.json` (byte-level BPE of LLaMA-3 and Qwen;
    what most current LLaMA-family folders ship), read by the `tokenizers` library. The specials come
    from the `tokenizer_config.json` beside it, as transformers reads them: `bos_token` (`null` for
    Qwen, which takes no BOS: `bos_id` is None), `eos_token` (an instruct model's may be `<|eot_id|>`
    or `<|im_end|>`), `pad_token`, else EOS for padding (padding is masked, and labels never read it).
    The file's post-processor is bypassed: BOS/EOS are added by id, as in `SPTokenizer`, whose
    interface this is."""

    def __init__(self, tokenizer_file):
        self.model_file = _require_file(tokenizer_file, "Hugging Face tokenizer.json")
        self.tok = Tokenizer.from_file(self.model_file)
        config_file = os.path.join(os.path.dirname(self.model_file), "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        where = config_file if config else f"{self.model_file} (no tokenizer_config.json beside it)"
        # an explicit `"bos_token": null` is a model without BOS (Qwen); a config that does not say is
        # refused rather than guessed, since a wrong guess shifts every prompt by one token
        if "bos_token" in config and config["bos_token"] is None:
            self.bos_id: int | None = None
        else:
            self.bos_id = self._id(config.get("bos_token"), "bos_token", where)
        self.eos_id = self._id(config.get("eos_token"), "eos_token", where)
        pad = config.get("pad_token")
        self.pad_id = self.eos_id if pad is None else self._id(pad, "pad_token", where)
        self.unk_id = self.eos_id  # byte-level BPE has no unknown token
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self._special |= {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        self._head = [] if self.bos_id is None else [self.bos_id]  # what bos=True puts first

    def _id(self, token, key: str, where: str) -> int:
        content = token.get("content") if isinstance(token, dict) else token  # AddedToken or plain string
        if content is None:
            hint = ' (write "bos_token": null for a model without BOS)' if key == "bos_token" else ""
            raise ValueError(f"{where}: names no {key}{hint}")
        i = self.tok.token_to_id(content)
        if i is None:
            raise ValueError(f"{where}: {key} {content!r} is not a token of {self.model_file}")
        return i

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        return self._head * bos + self.tok.encode(text, add_special_tokens=False).ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Text of `ids` (list or 1-D tensor), special tokens skipped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:  # e.g. an LLM whose output layer is wider than the tokenizer
            raise ValueError(f"decode: ids {bad[:5]} are outside the tokenizer's {self.vocab_size} ids")
        return self.tok.decode([i for i in ids if i not in self._special], skip_special_tokens=False)

    def batch_encode(self, texts: Sequence[str], *, max_length: int | None = None, padding_side: Side = "right",
                     truncation_side: Side = "right", bos: bool = True, eos: bool = False,
                     padding: str = "longest") -> dict[str, torch.Tensor]:
        """texts -> {input_ids (B, T), attention_mask (B, T)}; BOS/EOS survive truncation."""
        bodies = [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]
        return _pad_batch(bodies, head=self._head * bos, tail=[self.eos_id] * eos, pad_id=self.pad_id,
                          max_length=max_length, padding=padding, padding_side=padding_side,
                          truncation_side=truncation_side)


def llm_tokenizer(path, *, convention: str = "llama") -> SPTokenizer | JSONTokenizer:
    """The LLM tokenizer of a local file: a SentencePiece `tokenizer.model` (LLaMA-1/2, Vicuna, Mistral)
    or a Hugging Face `tokenizer.json` (LLaMA-3, Qwen2 / Qwen2.5 / Qwen3)."""
    if os.fspath(path).endswith(".json"):
        if convention != "llama":
            raise ValueError(f"{path}: the {convention!r} convention is for Vicuna's SentencePiece "
                             "tokenizer.model; a tokenizer.json takes its specials from tokenizer_config.json")
        return JSONTokenizer(path)
    return SPTokenizer(path, convention=convention)


# ---------------------------------------------------------------------------------------------- Q-Former

class _WordPieceBackend:
    """bert-base-uncased WordPiece through the `tokenizers` library, [DEC] appended after the vocabulary."""

    SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    def __init__(self, vocab_file: str, *, lowercase: bool, dec_token: str):
        with open(vocab_file, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        vocab = {tok: i for i, tok in enumerate(lines)}
        if len(vocab) != len(lines):  # ids would have holes and [DEC] could collide with a real token
            dup = sorted({t for t in lines if lines.count(t) > 1})[:5]
            raise ValueError(f"{vocab_file}: repeated tokens {dup}; a BERT vocab has one token per line, no repeats")
        missing = [s for s in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if s not in vocab]
        if missing:
            raise ValueError(f"{vocab_file}: BERT vocabulary lacks {missing}")
        tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        # specials in the text stay whole and are not lower-cased, as in transformers
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                for s in (*self.SPECIALS, dec_token) if s in vocab or s == dec_token])
        self.tok, self.vocab = tok, vocab
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.ids = {name: tok.token_to_id(name) for name in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")}
        self.ids["[DEC]"] = tok.token_to_id(dec_token)
        assert dec_token in vocab or self.ids["[DEC]"] == len(vocab)  # appended: 30522 for bert-base, as BLIP-2

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class _SentencePieceBackend:
    """Our own SentencePiece model with [PAD]=0, [UNK]=1 and [CLS], [SEP], [DEC] as control symbols."""

    def __init__(self, model_file: str):
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.sp.get_piece_size()
        self.ids = {}
        for name in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]"):
            i = self.sp.piece_to_id(name)
            if self.sp.id_to_piece(i) != name:
                raise ValueError(f"{model_file}: no {name} piece; train it with QFormerTokenizer.train_sentencepiece")
            self.ids[name] = i
        self._special = set(self.ids.values())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in self._special])


class QFormerTokenizer:
    """The Q-Former's tokenizer: [CLS] text [SEP]; `dec_id` replaces [CLS] for image-grounded generation."""

    def __init__(self, backend: _WordPieceBackend | _SentencePieceBackend):
        self.backend = backend
        self.vocab_size = backend.vocab_size  # the Q-Former's word embeddings have this many rows
        self.pad_id, self.unk_id = backend.ids["[PAD]"], backend.ids["[UNK]"]
        self.cls_id, self.sep_id, self.dec_id = backend.ids["[CLS]"], backend.ids["[SEP]"], backend.ids["[DEC]"]

    @classmethod
    def from_bert_vocab(cls, vocab_file, *, lowercase: bool = True, dec_token: str = "[DEC]") -> QFormerTokenizer:
        """BLIP-2's tokenizer from a bert-base-uncased `vocab.txt`: [DEC] appended (id 30522)."""
        return cls(_WordPieceBackend(_require_file(vocab_file, "BERT vocab file"),
                                     lowercase=lowercase, dec_token=dec_token))

    @classmethod
    def from_sentencepiece(cls, model_file) -> QFormerTokenizer:
        return cls(_SentencePieceBackend(_require_file(model_file, "Q-Former SentencePiece model")))

    @classmethod
    def train_sentencepiece(cls, texts: Sequence[str], out_path, vocab_size: int) -> QFormerTokenizer:
        """Train the tiny default's Q-Former tokenizer on `texts` ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [DEC]=4)."""
        _train_sentencepiece(texts, out_path, vocab_size=vocab_size, model_type="bpe",
                             control_symbols=("[CLS]", "[SEP]", "[DEC]"),
                             pieces={"pad_id": 0, "unk_id": 1, "bos_id": -1, "eos_id": -1,
                                         "pad_piece": "[PAD]", "unk_piece": "[UNK]"})
        return cls.from_sentencepiece(out_path)

    def encode(self, text: str) -> list[int]:
        return [self.cls_id] + self.backend.encode(text) + [self.sep_id]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.backend.decode(ids)

    def batch_encode(self, texts: Sequence[str], *, max_length: int | None = None, truncation_side: Side = "right",
                     padding: str = "longest", padding_side: Side = "right") -> dict[str, torch.Tensor]:
        """texts -> {input_ids (B, T), attention_mask (B, T)}, each row [CLS] ... [SEP] [PAD]*."""
        return _pad_batch([self.backend.encode(t) for t in texts], head=[self.cls_id], tail=[self.sep_id],
                          pad_id=self.pad_id, max_length=max_length, padding=padding,
                          padding_side=padding_side, truncation_side=truncation_side)
