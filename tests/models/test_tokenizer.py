"""Tokenizers: exact round trips, deterministic training, InstructBLIP-Vicuna ids, BERT WordPiece parity."""

import hashlib
import string
from pathlib import Path

import pytest
import torch

from expvl.models.tokenizer import QFormerTokenizer, SPTokenizer

CORPUS = [
    "The person raises the inner brows and pulls the lip corners up.",
    "AU1 inner brow raiser, AU12 lip corner puller: intensity 3 of 5.",
    "Happiness is shown by raised cheeks and a smile; surprise by raised brows.",
    "The eyes are tightened, the nose is wrinkled, the upper lip is raised.",
    "Is AU25 (lips part) present? Yes. Is AU26 present? No.",
    "Describe the mouth region of this face.",
    "Frames 2024 and 1999, scores 100 and 2048, 0 1 2 3 4 5 6 7 8 9.",  # digit runs merge without split_digits
] * 30

HOSTILE = [
    "", " ", "  two leading", "trailing  ", "a  b   c    d", "\t\ttab\nnew\r\nline\n\n",
    "0123456789 3.14159 -42 1e10", "naïve café Ω≈ç√ 日本語 한국어 😀👍🏽", "\u200bzero\u00a0width",
    "ｆｕｌｌｗｉｄｔｈ ﬁ ligature", "e\u0301 combining", "<s> </s> <unk> [PAD] literal specials",
    "\x00\x01\x7f control", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 " * 5,
]


@pytest.fixture(scope="module")
def llm_tok(tmp_path_factory):
    return SPTokenizer.train(CORPUS, tmp_path_factory.mktemp("sp") / "llm.model", vocab_size=400)


def test_llama_convention_ids_of_a_trained_model(llm_tok):
    assert (llm_tok.unk_id, llm_tok.bos_id, llm_tok.eos_id, llm_tok.pad_id) == (0, 1, 2, 3)
    assert llm_tok.sp.id_to_piece(1) == "<s>" and llm_tok.sp.id_to_piece(2) == "</s>"
    ids = llm_tok.encode("the brows", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids


@pytest.mark.parametrize("text", HOSTILE)
def test_exact_round_trip_on_hostile_text(llm_tok, text):
    for bos, eos in [(True, False), (False, True), (True, True)]:
        ids = llm_tok.encode(text, bos=bos, eos=eos)
        assert llm_tok.unk_id not in ids                 # byte fallback: nothing is unknown
        assert llm_tok.decode(ids) == text
        assert llm_tok.decode(torch.tensor(ids)) == text


def test_decode_refuses_ids_outside_the_vocabulary(llm_tok):
    with pytest.raises(ValueError, match="outside"):
        llm_tok.decode([5, llm_tok.vocab_size + 7])


def test_digits_are_split(llm_tok):
    pieces = llm_tok.sp.encode("2024", out_type=str)
    assert not any(p.startswith("<0x") for p in pieces)
    assert [p.lstrip("▁") for p in pieces if p.lstrip("▁")] == ["2", "0", "2", "4"]


def test_training_is_deterministic(tmp_path):
    a = SPTokenizer.train(CORPUS, tmp_path / "a.model", vocab_size=400)
    b = SPTokenizer.train(CORPUS, tmp_path / "b.model", vocab_size=400)
    digest = [hashlib.sha256(Path(t.model_file).read_bytes()).hexdigest() for t in (a, b)]
    assert digest[0] == digest[1]
    c = SPTokenizer.train(CORPUS[:-30] + ["zebra quokka"] * 30, tmp_path / "c.model", vocab_size=400)
    assert hashlib.sha256(Path(c.model_file).read_bytes()).hexdigest() != digest[0]   # the hash can fail


def test_instructblip_vicuna_convention(llm_tok):
    """Reference §4: </s> is BOS, EOS and UNK; [PAD] appended as id n (32000 for Vicuna), vocab n + 1."""
    n = llm_tok.sp.get_piece_size()
    tok = SPTokenizer(llm_tok.model_file, convention="instructblip-vicuna")
    assert tok.bos_id == tok.eos_id == tok.unk_id == llm_tok.sp.piece_to_id("</s>") == 2
    assert (tok.pad_id, tok.vocab_size) == (n, n + 1)
    ids = tok.encode("the lip corners", eos=True)
    assert ids[0] == 2 and ids[-1] == 2 and ids[1:-1] == llm_tok.sp.encode("the lip corners")
    # InstructBLIP inputs: right padding, left truncation keeping the BOS
    batch = tok.batch_encode(["the lip corners are pulled up", "the"], max_length=5, truncation_side="left")
    body = llm_tok.sp.encode("the lip corners are pulled up")
    assert batch["input_ids"][0].tolist() == [2] + body[-4:]
    assert batch["input_ids"][1].tolist() == [2] + llm_tok.sp.encode("the") + [n] * (4 - len(llm_tok.sp.encode("the")))
    assert tok.decode(batch["input_ids"][1]) == "the"
    with pytest.raises(ValueError, match="fixes pad_id"):
        SPTokenizer(llm_tok.model_file, convention="instructblip-vicuna", pad_id=0)


def test_batch_padding_and_truncation_sides(llm_tok):
    texts = ["the brows", "the person raises the inner brows"]
    long_ids, short_ids = llm_tok.sp.encode(texts[1]), llm_tok.sp.encode(texts[0])
    right = llm_tok.batch_encode(texts, eos=True)
    T = len(long_ids) + 2
    assert right["input_ids"].shape == (2, T) and right["input_ids"].dtype == torch.long
    assert right["input_ids"][0].tolist() == [1] + short_ids + [2] + [3] * (T - len(short_ids) - 2)
    assert right["attention_mask"][0].tolist() == [1] * (len(short_ids) + 2) + [0] * (T - len(short_ids) - 2)
    left = llm_tok.batch_encode(texts, eos=True, padding_side="left")
    assert left["input_ids"][0].tolist() == [3] * (T - len(short_ids) - 2) + [1] + short_ids + [2]
    assert left["attention_mask"].flip(1).tolist() == right["attention_mask"].tolist()
    cut_r = llm_tok.batch_encode(texts, max_length=4, eos=True)["input_ids"][1].tolist()
    cut_l = llm_tok.batch_encode(texts, max_length=4, eos=True, truncation_side="left")["input_ids"][1].tolist()
    assert cut_r == [1] + long_ids[:2] + [2] and cut_l == [1] + long_ids[-2:] + [2]
    fixed = llm_tok.batch_encode(texts[:1], max_length=12, padding="max_length")
    assert fixed["input_ids"].shape == (1, 12)
    with pytest.raises(ValueError, match="special tokens"):
        llm_tok.batch_encode(texts, max_length=1, eos=True)
    with pytest.raises(ValueError, match="padding_side"):
        llm_tok.batch_encode(texts, padding_side="middle")


def test_repeated_bert_vocab_lines_are_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\nthe\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.txt: repeated tokens \['the'\]"):
        QFormerTokenizer.from_bert_vocab(tmp_path / "vocab.txt")


def test_missing_tokenizer_files_name_the_path(tmp_path):
    for make in (SPTokenizer, QFormerTokenizer.from_sentencepiece, QFormerTokenizer.from_bert_vocab):
        with pytest.raises(FileNotFoundError, match="nowhere/tok"):
            make(tmp_path / "nowhere" / "tok.model")


# ---------------------------------------------------------------------------------------------- Q-Former

WORDS = [
    "the", "a", "an", "of", "and", "or", "is", "are", "was", "to", "in", "on", "with", "by", "for",
    "this", "that", "face", "person", "brow", "brows", "inner", "outer", "raise", "raiser", "raised",
    "lip", "lips", "corner", "corners", "pull", "puller", "eye", "eyes", "lid", "nose", "wrinkle",
    "cheek", "chin", "jaw", "drop", "mouth", "smile", "happy", "sad", "surprise", "fear", "anger",
    "disgust", "contempt", "neutral", "yes", "no", "present", "absent", "describe", "region", "action",
    "unit", "au", "intensity", "left", "right", "upper", "lower", "un", "want", "aff", "able", "cafe",
    "naive",
]
PIECES = [
    "##s", "##ed", "##er", "##ing", "##ly", "##able", "##ness", "##ful", "##a", "##e", "##i", "##o",
    "##u", "##n", "##t", "##r", "##y", "##1", "##2", "##5",
]


def _bert_vocab(path):
    """A bert-base-uncased-shaped vocab: [PAD]=0, [unused*], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
    vocab += [w for w in WORDS if len(w) > 1] + PIECES + ["日", "本", "é"]
    vocab += ["##want", "##aff", "text"] + [f"##{c}" for c in "bcdfghjklmpqvwxz0346789"]  # longest-match paths
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return len(vocab)


BERT_TEXTS = [
    "The person raises the inner brows.", "AU12: lip-corner puller (intensity 3/5)!",
    "Naïve café; ÉLAN — façade…", "unwanted unaffable raisers", "Supercalifragilisticexpialidocious words",
    "  spaces\tand\nnewlines  ", "日本語 text", "numbers 12 125 2025 3.5", "emoji 😀 and [SEP] inside [MASK]",
    "x" * 120, "", "\x00control\x7fchars",
]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    n = _bert_vocab(path)
    return path, n


def test_wordpiece_matches_transformers_bert_tokenizer(bert):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy  # pure-Python oracle
    path, n = bert
    ours = QFormerTokenizer.from_bert_vocab(path)
    ref = BertTokenizerLegacy(str(path), do_lower_case=True)
    ref.add_special_tokens({"bos_token": "[DEC]"})                   # BLIP-2 init_tokenizer
    assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id) == (0, 100, 101, 102)
    assert ours.dec_id == ref.bos_token_id == n and ours.vocab_size == len(ref) == n + 1
    for text in BERT_TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"], text
    assert ours.backend.encode("x" * 120) == [ours.unk_id]             # over-long word -> [UNK]
    batch = ours.batch_encode(BERT_TEXTS, max_length=8)
    want = ref(BERT_TEXTS, max_length=8, truncation=True, padding="longest", return_tensors="pt")
    assert torch.equal(batch["input_ids"], want["input_ids"])
    assert torch.equal(batch["attention_mask"], want["attention_mask"])


def test_wordpiece_left_truncation_matches_transformers(bert):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    path, _ = bert
    ours = QFormerTokenizer.from_bert_vocab(path)
    ref = BertTokenizerLegacy(str(path), do_lower_case=True, truncation_side="left")
    got = ours.batch_encode(BERT_TEXTS[:4], max_length=6, truncation_side="left")
    want = ref(BERT_TEXTS[:4], max_length=6, truncation=True, padding="longest", return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])


def test_wordpiece_lowercases_and_decodes(bert):
    ours = QFormerTokenizer.from_bert_vocab(bert[0])
    assert ours.encode("The BROWS") == ours.encode("the brows")
    assert ours.decode(ours.encode("The person raises the brows.")) == "the person raises the brows."


def test_sentencepiece_qformer_tokenizer(tmp_path):
    tok = QFormerTokenizer.train_sentencepiece(CORPUS, tmp_path / "q.model", vocab_size=400)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.dec_id) == (0, 1, 2, 3, 4)
    ids = tok.encode("The [CLS] brows 😀")
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and ids.count(tok.cls_id) == 1  # no specials from text
    assert tok.decode(ids) == "The [CLS] brows 😀"                                           # cased, exact
    batch = tok.batch_encode(["the brows", "the person raises the inner brows"], max_length=5,
                             truncation_side="left")
    assert batch["input_ids"][0, 0] == tok.cls_id and batch["input_ids"][1].tolist()[-1] == tok.sep_id
    assert batch["input_ids"][1].tolist()[1:-1] == tok.backend.encode("the person raises the inner brows")[-3:]
    assert (batch["input_ids"][0][batch["attention_mask"][0] == 0] == tok.pad_id).all()
    QFormerTokenizer.train_sentencepiece(CORPUS, tmp_path / "q2.model", vocab_size=400)
    assert (tmp_path / "q.model").read_bytes() == (tmp_path / "q2.model").read_bytes()


def test_sentencepiece_model_without_qformer_pieces_is_refused(llm_tok):
    with pytest.raises(ValueError, match=r"no \[PAD\] piece"):
        QFormerTokenizer.from_sentencepiece(llm_tok.model_file)
