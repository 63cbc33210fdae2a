"""The local parts of a `train.py mode=stage` run, made small: the module fixture `parts` and `stage_args`.

`parts` is a synthesized data root, a written vocab.txt, a SentencePiece LLM tokenizer trained on the
data's text and a random LLaMA saved as a Hugging Face folder with one row fewer than that tokenizer
(so `resize_vocab` runs). A test module uses it by importing it (`# noqa: F401`); being module-scoped,
it is built once per module that does. Shared by tests/training/test_single_stage.py,
tests/evaluation/test_eval_stage_run.py, tests/models/test_tokenizer_json.py and
tests/models/test_hf_blip2_folder.py.
"""

from pathlib import Path

import pytest
import torch

from expvl.models.llm import LLaMA, LLMConfig

VOCAB_WORDS = ["is", "the", "a", "are", "inner", "outer", "brow", "raised", "lowered", "lip", "corner", "yes",
               "no", "face", "happy", "sad", "question", "answer", "?"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    from expvl.configs import load_config
    from expvl.configs.schema import RunConfig
    from expvl.models.convert.hf_export import save_hf_llama
    from expvl.models.tokenizer import SPTokenizer
    from expvl.synthesis.build import run as synthesize
    from expvl.training.bootstrap import corpus
    from expvl.vocab.shards import read_split_records

    root = tmp_path_factory.mktemp("parts")
    syn = load_config(RunConfig, ["tiny"], ["synthesis.synthfacs.n_train=32", "synthesis.synthfacs.n_val=8",
                                            "synthesis.synthfacs.n_test=8", "synthesis.synthfacs.n_identities_train=8",
                                            "synthesis.synthfacs.n_identities_test=4"])
    syn.synthesis.out_dir = str(root / "data")
    synthesize(syn.synthesis)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *VOCAB_WORDS]) + "\n")
    tok = SPTokenizer.train(corpus(read_split_records(root / "data"), syn), root / "llm.model", 400)
    torch.manual_seed(0)
    llm = LLaMA(LLMConfig(vocab_size=tok.vocab_size - 1, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                          hidden_dim=64, max_seq_len=256, tie_embeddings=True))
    save_hf_llama(llm, root / "hf")
    return {"data": root / "data", "vocab": vocab, "llm": root / "hf", "llm_tokenizer": root / "llm.model",
            "llm_vocab": tok.vocab_size}


def stage_args(parts: dict, run_dir: Path, stage: str, *extra: str) -> list[str]:
    return ["--config", "tiny", "mode=stage", f"stage={stage}", f"run_dir={run_dir}", f"data.root={parts['data']}",
            f"pretrained.qformer_vocab={parts['vocab']}", f"pretrained.llm={parts['llm']}",
            f"pretrained.llm_tokenizer={parts['llm_tokenizer']}", "pretrained.llm_dtype=fp32",
            "trainer.progress_bar=false", "stage1.batch_size=4", "stage2.batch_size=4",
            "random_init=[vision,qformer]", *extra]  # tiny random parts, on purpose
