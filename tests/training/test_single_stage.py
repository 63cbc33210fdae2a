"""`train.py mode=stage` (single_stage.py): vocabulary growth, stage chaining, multi-process safety.

The local parts a real recipe names in `pretrained.*` are made small (tests/helpers/stage_parts.py),
in seconds, instead of from the tiny pipeline run (tests/training/test_pipeline.py): a synthesized
data root, a SentencePiece LLM tokenizer trained on its text, a random LLaMA saved as a Hugging Face
folder with one row fewer than that tokenizer (so `resize_vocab` runs, as for InstructBLIP's Vicuna),
and a written vocab.txt.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from expvl.models.blip2 import Blip2, Blip2Config
from expvl.models.convert.weights import CheckpointError
from expvl.models.llm import LLaMA, LLMConfig, fit_vocab, resize_vocab
from expvl.models.optim import OptimConfig
from expvl.models.qformer import QFormerConfig
from expvl.models.vision import VisionConfig
from expvl.training.lit_blip2 import LitLanguage, LitPretrain
from expvl.training.run_folder import Step
from expvl.training.stages import init_from_stage_checkpoints, trainable
from tests.conftest import REPO
from tests.helpers.stage_parts import parts, stage_args  # noqa: F401 -- module fixture

# ---- resize_vocab: grow embed_tokens / lm_head in place --------------------------------------------------

def _old_resize(llm: LLaMA, vocab_size: int) -> LLaMA:
    """The previous implementation (a second LLaMA, then copies): the reference for the result."""
    from dataclasses import replace
    grown = LLaMA(replace(llm.config, vocab_size=vocab_size)).to(llm.model.embed_tokens.weight.dtype)
    state = llm.state_dict()
    with torch.no_grad():
        for key, t in grown.state_dict().items():
            src = state[key]
            if t.shape == src.shape:
                t.copy_(src)
            else:
                t[:src.shape[0]].copy_(src)
                t[src.shape[0]:].copy_(src.float().mean(0, keepdim=True).to(t.dtype))
    return grown


def _tiny_llm(tied: bool, vocab: int = 50) -> LLaMA:
    return LLaMA(LLMConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                           max_seq_len=64, tie_embeddings=tied)).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_resize_vocab_grows_in_place_as_the_rebuild_did(tied, monkeypatch):
    llm = _tiny_llm(tied)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        before = llm(input_ids=ids)["logits"]
    reference = _old_resize(llm, 53).state_dict()
    layers, params = llm.model.layers, {n: p for n, p in llm.named_parameters() if "embed" not in n}
    params.pop("lm_head.weight", None)

    def no_second_model(*a, **k):
        raise AssertionError("resize_vocab built another LLaMA")

    monkeypatch.setattr(LLaMA, "__init__", no_second_model)
    out = resize_vocab(llm, 53)
    monkeypatch.undo()

    assert out is llm and llm.model.layers is layers  # the same model, grown; nothing else rebuilt
    for name, p in llm.named_parameters():
        if name in params:
            assert p is params[name], name
    assert llm.config.vocab_size == 53 and llm.model.embed_tokens.num_embeddings == 53
    assert (llm.lm_head is None) == tied  # tied stays tied: the head is the embedding matrix
    if not tied:
        assert llm.lm_head.out_features == 53 and llm.lm_head.weight.shape == (53, 32)
    state = llm.state_dict()
    assert state.keys() == reference.keys()
    for key in state:
        torch.testing.assert_close(state[key], reference[key], rtol=0, atol=0, msg=key)
    with torch.no_grad():
        after = llm(input_ids=ids)["logits"]
    assert after.shape[-1] == 53
    torch.testing.assert_close(after[..., :50], before, rtol=0, atol=0)  # old tokens: logits unchanged
    emb = llm.model.embed_tokens.weight
    torch.testing.assert_close(emb[50:], emb[:50].mean(0, keepdim=True).expand(3, -1))


def test_resize_vocab_keeps_dtype_grad_flag_and_a_shared_head():
    llm = _tiny_llm(tied=False).half()
    llm.lm_head.weight = llm.model.embed_tokens.weight  # a head tied by sharing the Parameter
    llm.model.embed_tokens.weight.requires_grad_(False)
    resize_vocab(llm, 51)
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    assert llm.model.embed_tokens.weight.dtype == torch.float16 and not llm.model.embed_tokens.weight.requires_grad
    assert resize_vocab(llm, 51) is llm  # no change when the sizes agree
    with pytest.raises(ValueError, match="smaller"):
        resize_vocab(llm, 40)


def test_fit_vocab_grows_for_a_larger_tokenizer_and_keeps_a_padded_decoder():
    llm = _tiny_llm(tied=False)
    before = llm.model.embed_tokens.weight.clone()
    assert fit_vocab(llm, 40) is llm and llm.config.vocab_size == 50  # OPT: 50265 tokens, 50272 rows
    assert torch.equal(llm.model.embed_tokens.weight, before)
    assert fit_vocab(llm, 52).config.vocab_size == 52 and llm.lm_head.weight.shape[0] == 52


# ---- init_checkpoints: each file gives what its own stage trained ------------------------------------------

QF = QFormerConfig.from_name("tiny", vocab_size=40)
LLM = LLMConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


def _blip(stage: str) -> Blip2:
    return Blip2(Blip2Config(stage=stage, vision=VisionConfig.from_name("tiny-vit"), qformer=QF,
                             llm=None if stage == "pretrain" else LLM), llm=None)


def _stage_ckpt(path: Path, lit, *, drop: str = "", **extra) -> Path:
    """A checkpoint as run_stage writes it (trimmed state_dict + "stage"), optionally without some keys."""
    state = {k: v for k, v in lit.state_dict().items() if not (drop and k.startswith(drop))}
    torch.save({"state_dict": state, "stage": lit.model.cfg.stage, **extra}, path)
    return path


def _lit1(model):
    return LitPretrain(model, trainable=trainable(model), optim=OptimConfig(), total_steps=1, dec_token_id=4,
                       pad_token_id=0)


def test_stage1_checkpoint_initialises_a_stage2_model_and_leaves_llm_proj_fresh(tmp_path):
    m1 = _blip("pretrain")
    ck1 = _stage_ckpt(tmp_path / "1.ckpt", _lit1(m1))
    m2 = _blip("caption")
    proj = m2.llm_proj.weight.detach().clone()
    loaded = init_from_stage_checkpoints(m2, [ck1])
    assert "qformer.query_tokens" in loaded and not any(k.startswith("llm_proj.") for k in loaded)
    torch.testing.assert_close(m2.qformer.query_tokens, m1.qformer.query_tokens)
    torch.testing.assert_close(m2.llm_proj.weight, proj)
    # stage 3 from stages 1 and 2: the whole Q-Former from 1, then what 2 trained (its llm_proj)
    with torch.no_grad():
        m2.llm_proj.weight.add_(1.0)
    ck2 = _stage_ckpt(tmp_path / "2.ckpt", LitLanguage(m2, trainable=trainable(m2), optim=OptimConfig(), total_steps=1))
    m3 = _blip("instruct")
    init_from_stage_checkpoints(m3, [ck1, ck2])
    torch.testing.assert_close(m3.llm_proj.weight, m2.llm_proj.weight)
    torch.testing.assert_close(m3.qformer.bert.embeddings.word_embeddings.weight,
                               m1.qformer.bert.embeddings.word_embeddings.weight)


def test_an_encoder_fine_tuned_by_a_stage_is_handed_on(tmp_path):
    m2 = Blip2(Blip2Config(stage="caption", vision=VisionConfig.from_name("tiny-vit", freeze=False), qformer=QF,
                           llm=LLM), llm=None)  # Exp-BLIP step 2 trains the ViT
    with torch.no_grad():
        m2.vision.visual.conv1.weight.add_(1.0)
    ck2 = _stage_ckpt(tmp_path / "2.ckpt", LitLanguage(m2, trainable=trainable(m2), optim=OptimConfig(), total_steps=1))
    ck1 = _stage_ckpt(tmp_path / "1.ckpt", _lit1(_blip("pretrain")))
    m3 = _blip("instruct")
    loaded = init_from_stage_checkpoints(m3, [ck1, ck2])  # stage 3's whole Q-Former needs stage 1
    assert "vision.visual.conv1.weight" in loaded
    torch.testing.assert_close(m3.vision.visual.conv1.weight, m2.vision.visual.conv1.weight)
    # a stage that kept the encoder frozen saved none of it: the next one keeps its own
    own = _blip("instruct")
    before = own.vision.visual.conv1.weight.detach().clone()
    init_from_stage_checkpoints(own, [ck1])
    assert torch.equal(own.vision.visual.conv1.weight, before)


def test_stage_checkpoint_errors_name_the_file_and_the_key(tmp_path):
    m1 = _blip("pretrain")
    no_qformer = _stage_ckpt(tmp_path / "noq.ckpt", _lit1(m1), drop="model.qformer.")
    with pytest.raises(CheckpointError, match=r"qformer\..*noq\.ckpt"):
        init_from_stage_checkpoints(_blip("caption"), [no_qformer])
    # a stage-1 file without any of the parts it must hand on: nothing to give at all
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {"model.vision_proj.weight": torch.zeros(1)}, "stage": "pretrain"}, bare)
    with pytest.raises(CheckpointError, match=r"bare\.ckpt: no tensor under"):
        init_from_stage_checkpoints(_blip("caption"), [bare])
    # a stage-2 file that lost its llm_proj fails instead of leaving the projection random
    m2 = _blip("caption")
    no_proj = _stage_ckpt(tmp_path / "noproj.ckpt", LitLanguage(m2, trainable=trainable(m2), optim=OptimConfig(), total_steps=1),
                          drop="model.llm_proj.")
    with pytest.raises(CheckpointError, match=r"llm_proj\.weight.*noproj\.ckpt"):
        init_from_stage_checkpoints(_blip("caption"), [no_proj])
    wrong = tmp_path / "wrong.ckpt"
    state = dict(_lit1(m1).state_dict())
    state["model.qformer.query_tokens"] = torch.zeros(1, 3, 5)
    torch.save({"state_dict": state, "stage": "pretrain"}, wrong)
    with pytest.raises(CheckpointError, match=r"wrong\.ckpt: qformer\.query_tokens has shape \(1, 3, 5\)"):
        init_from_stage_checkpoints(_blip("caption"), [wrong])
    unmarked = tmp_path / "last.ckpt"  # e.g. a periodic Lightning checkpoint: no "stage" entry
    torch.save({"state_dict": dict(_lit1(m1).state_dict())}, unmarked)
    with pytest.raises(CheckpointError, match=r"last\.ckpt: 'stage' entry is None"):
        init_from_stage_checkpoints(_blip("caption"), [unmarked])


# ---- Step on a DDP rank other than 0: reads only, decides as rank 0 does ----------------------------------

def test_a_reading_step_never_writes_and_agrees_with_rank_zero(tmp_path):
    old = Step(tmp_path, "stage1", {"lr": 1e-3})
    (old.dir / "checkpoints").mkdir()
    (old.dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    old.finish()
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # same inputs: done, like rank 0 sees it
    assert Step(tmp_path, "stage1", {"lr": 1e-3}, writer=False).done
    # other inputs, before rank 0 moved the folder aside: not done, nothing to resume, nothing touched
    reader = Step(tmp_path, "stage1", {"lr": 5e-4}, writer=False)
    assert not reader.done and reader.resume_path() is None
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing
    with pytest.raises(RuntimeError, match="only the writing rank"):
        reader.finish()
    writer = Step(tmp_path, "stage1", {"lr": 5e-4})
    assert not writer.done and writer.resume_path() is None
    # after rank 0 moved it: the same answer from the new folder
    again = Step(tmp_path, "stage1", {"lr": 5e-4}, writer=False)
    assert not again.done and again.resume_path() is None
    assert not list(writer.dir.glob(".*.tmp"))  # inputs.json went through a temporary file, none left


# ---- the real thing: train.py mode=stage from local parts ----------------------------------------------------

@pytest.mark.slow
def test_stage1_checkpoint_chains_into_stage2_as_the_readme_says(parts, tmp_path):  # noqa: F811
    """README "Real recipes": Exp-BLIP step 2 with `pretrained.init_checkpoints=[<stage 1 final.ckpt>]`."""
    from train import main

    first = main(stage_args(parts, tmp_path / "s1", "pretrain", "stage1.max_steps=2"))
    ck1 = torch.load(first["checkpoint"], map_location="cpu", weights_only=True)
    assert ck1["stage"] == "pretrain" and not any(k.startswith("model.llm_proj.") for k in ck1["state_dict"])
    # lr 1e-12 (0 is refused): one step moves a weight by ~1e-12, so stage 2's checkpoint shows the
    # weights it started from to well within 1e-8, against init values of ~0.02
    frozen = [f"stage2.optim.{k}=1e-12" for k in ("lr", "warmup_lr", "min_lr")] + ["stage2.max_steps=1"]
    second = main(stage_args(parts, tmp_path / "s2", "caption", f"pretrained.init_checkpoints=[{first['checkpoint']}]",
                             *frozen))
    ck2 = torch.load(second["checkpoint"], map_location="cpu", weights_only=True)
    assert ck2["stage"] == "caption" and ck2["global_step"] == 1
    shared = [k for k in ck2["state_dict"] if k.startswith(("model.qformer.", "model.ln_vision."))]
    assert shared and "model.qformer.query_tokens" in shared
    for key in shared:
        torch.testing.assert_close(ck2["state_dict"][key], ck1["state_dict"][key], rtol=0, atol=1e-8, msg=key)
    assert ck2["state_dict"]["model.llm_proj.weight"].shape[0] == 32  # the LLM's width; fresh, from no file
    assert ck2["run_config"]["pretrained"]["init_checkpoints"] == [first["checkpoint"]]


# ---- two DDP processes: only global rank 0 writes; final.ckpt appears whole ------------------------------

SCRIPT = REPO / "tests" / "helpers" / "ddp_single_stage_script.py"


def _run_ddp(cmd: list[str], log: Path) -> None:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR", "LANG") if k in os.environ}
    env["OMP_NUM_THREADS"] = "1"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # rank 1 is rank 0's child (or torchrun's): one group
        try:
            proc.wait(timeout=240)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, log.read_text()[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_ddp_stage_writes_only_on_rank_zero_and_final_ckpt_appears_whole(
        parts, tmp_path, launcher):  # noqa: F811
    """Lightning's launcher (`trainer.devices=2`, one machine) starts rank 1 inside rank 0's fit;
    torchrun (like SLURM's srun) starts both at once, here over a stale stage folder with a bogus
    last.ckpt that neither rank may resume from."""
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    stale = run_dir / "stage1"
    (stale / "checkpoints").mkdir(parents=True)
    (stale / "inputs.json").write_text(json.dumps({"hash": "0123456789abcdef"}))
    (stale / "done.json").write_text("{}")
    (stale / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    args = stage_args(parts, run_dir, "pretrain", "stage1.max_steps=2", "trainer.accelerator=cpu",
                      "trainer.devices=2", "trainer.strategy=ddp")
    launch = [sys.executable] if launcher == "lightning" else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    t0 = time.time()
    _run_ddp([*launch, str(SCRIPT), str(logs), str(run_dir), *args], tmp_path / "ddp.log")
    for _ in range(60):  # Lightning's rank 1 may still be exiting when rank 0 has returned
        if (logs / "rank1.json").exists():
            break
        time.sleep(1)
    ranks = [json.loads((logs / f"rank{r}.json").read_text()) for r in range(2)]
    print(f"{launcher}: {time.time() - t0:.0f} s")

    final = run_dir / "stage1" / "final.ckpt"
    assert ranks[1]["events"] == [], f"rank 1 wrote into the run folder: {ranks[1]['events']}"
    assert [r["summary"]["checkpoint"] for r in ranks] == [str(final)] * 2
    events = ranks[0]["events"]
    # final.ckpt is never written in place: it appears by a rename from beside it
    assert not [e for e in events if e[0] != "rename" and e[-1] == str(final)], events
    arrivals = [e for e in events if e[0] == "rename" and e[2] == str(final)]
    assert len(arrivals) == 1 and Path(arrivals[0][1]).parent == final.parent
    # the stale folder was moved aside once, by rank 0, and never resumed
    assert [e for e in events if e[0] == "rename" and e[1] == str(stale)] == \
        [["rename", str(stale), str(run_dir / "stage1.0123456789abcdef")]]
    ck = torch.load(final, map_location="cpu", weights_only=True)
    assert ck["stage"] == "pretrain" and ck["global_step"] == 2 and ck["run_config"]["run_dir"] == str(run_dir)
    assert json.loads((run_dir / "stage1" / "done.json").read_text())["hash"]
    assert (run_dir / "config.yaml").exists()
    assert not [p.name for p in (run_dir / "stage1").iterdir() if p.name.startswith(".")]  # no temporary left
