"""eval.py on a `train.py mode=stage` run folder (stage_run.py): config.yaml + stage3/final.ckpt, every
other part read from the paths in its config.

The data is DISFA-shaped: the tiny SynthFACS records of tests/helpers/stage_parts.py cut down to DISFA's
12 AUs and stripped of their emotion labels, so the AU list must come from the records (not
SynthFACS's 19) and the emotion section must be skipped. A tiny stage=instruct job trains on it
through train.py; `python eval.py --run` and `python eval.py ask --run` then read the folder.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from expvl.models.convert.weights import CheckpointError
from expvl.vocab.facs import DATASET_AUS, SYNTHFACS_AUS
from expvl.vocab.records import Record, VQAPair
from expvl.vocab.shards import read_manifest, read_split_records, write_shards
from tests.helpers.stage_parts import (
    parts,  # noqa: F401 -- its module fixture (data, vocab, tokenizer, LLM), reused
    stage_args,
)

DISFA = DATASET_AUS["disfa12"]  # holds AU9, which the tiny config holds out of Q3 training (zero-shot)


def _disfa_like(src: Path, dst: Path) -> Path:
    """The records of `src` with DISFA's AUs only and no emotion, written as a shard set at `dst`."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    splits = read_split_records(dst)
    for records in splits.values():
        for r in records:
            r.aus = {au: v for au, v in r.aus.items() if au in DISFA}
            r.intensities = {au: v for au, v in r.intensities.items() if au in DISFA}
            r.emotion = None
            r.vqa = [p for p in r.vqa if p.type != "emotion" and (p.type != "q3" or p.au in DISFA)]
    write_shards(dst, splits, cfg_hash=m["config_hash"], seed=m["seed"], shard_size=10_000,
                 image_root=m["image_root"], extra=m["extra"])
    return dst


@pytest.fixture(scope="module")
def stage_run(request, tmp_path_factory) -> dict:
    from train import main

    root = tmp_path_factory.mktemp("stage_eval")
    base = request.getfixturevalue("parts")
    local = {**base, "data": _disfa_like(base["data"], root / "data")}
    run_dir = root / "run"
    main(stage_args(local, run_dir, "instruct", "stage3.max_steps=2", "stage3.batch_size=4"))
    return {"dir": run_dir, "data": local["data"]}


def test_eval_py_evaluates_a_stage_run_over_the_data_aus(stage_run):
    from eval import main

    run_dir = stage_run["dir"]
    assert not (run_dir / "data").exists() and not (run_dir / "tokenizers").exists()  # not the pipeline's layout
    main(["--run", str(run_dir)])
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    test = read_split_records(stage_run["data"])["test"]
    assert metrics["records"] == len(test)
    for section in ("au_vqa_scoring", "au_vqa_scoring_calibrated", "au_vqa_generation"):
        assert list(metrics[section]["support"]) == list(DISFA), section  # the data's AUs, FACS order
        assert 0.0 <= metrics[section]["macro_f1"] <= 1.0
    assert set(SYNTHFACS_AUS) - set(DISFA) and not set(metrics["au_vqa_scoring"]["f1"]) - set(DISFA)
    assert metrics["q3_questions"] == sum(p.type == "q3" for r in test for p in r.vqa) > 0
    assert metrics["zero_shot_aus"] == ["AU9"] and metrics["seen_aus"] == [a for a in DISFA if a != "AU9"]
    assert metrics["headline"]["au_macro_f1_scoring"] == metrics["au_vqa_scoring"]["macro_f1"]
    # no emotion labels and no stage-2 model: both skipped, and said so
    assert "emotion" not in metrics and "emotion_accuracy" not in metrics["headline"]
    assert metrics["probes"] == {}
    skipped = metrics["meta"]["not evaluated"]
    assert "emotion" in skipped and "stage-2" in skipped
    report = (run_dir / "eval" / "report.md").read_text()
    assert "## AU detection" in report and "AU9 | zero-shot" in report and "AU10" not in report
    assert "| not evaluated |" in report and "## Emotion" not in report and "## Q-Former" not in report


def test_eval_py_ask_answers_with_a_stage_run(stage_run, tmp_path):
    from eval import main

    face = tmp_path / "face.png"
    Image.new("RGB", (80, 96), (150, 120, 100)).save(face)
    answer = main(["ask", "--run", str(stage_run["dir"]), "--image", str(face), "--question",
                   "Is the inner brow raised?"])
    assert isinstance(answer, str)


def test_the_stage_model_is_the_trained_one_and_loads_strictly(stage_run, tmp_path):
    from expvl.training.checkpoints import load_trained
    from expvl.training.runs import Blip2Run, open_run
    from expvl.training.stages import trainable

    run = open_run(stage_run["dir"])
    assert isinstance(run, Blip2Run) and run.trains("instruct") and not run.trains("caption")
    model = run.stage_model("instruct")
    ck = torch.load(run.checkpoint("instruct"), map_location="cpu", weights_only=True)
    ours = model.state_dict()
    for key, t in ck["state_dict"].items():
        torch.testing.assert_close(ours[key.removeprefix("model.")], t, rtol=0, atol=0, msg=key)
    # vocabulary grown as in training: the HF LLaMA has one row fewer than its tokenizer
    assert model.llm.config.vocab_size == run.tokenizers["llm"].vocab_size
    with pytest.raises(FileNotFoundError, match=r"trained stage 'instruct' only.*'caption'"):
        run.stage_model("caption")

    bad = dict(ck, state_dict={k: v for k, v in ck["state_dict"].items() if "llm_proj" not in k})
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"bad\.ckpt does not hold what stage 'instruct' trained: "
                                              r"missing \['llm_proj\.bias', 'llm_proj\.weight'\]"):
        load_trained(model, tmp_path / "bad.ckpt", trainable(model), stage="instruct")
    torch.save(dict(ck, stage="caption"), tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=r"other\.ckpt was written by stage 'caption'"):
        load_trained(model, tmp_path / "other.ckpt", trainable(model), stage="instruct")


def test_a_stage_run_without_its_checkpoint_names_the_path_and_the_stage(stage_run, tmp_path):
    from expvl.evaluation.evaluate import evaluate
    from expvl.training.runs import open_run

    shutil.copy(stage_run["dir"] / "config.yaml", tmp_path / "config.yaml")
    with pytest.raises(FileNotFoundError, match=r"stage3/final\.ckpt not found: stage 'instruct'"):
        evaluate(open_run(tmp_path))


def test_an_au_outside_the_data_names_the_record():
    from expvl.evaluation.vqa import _au_rows, data_aus

    asks_au10 = Record(id="face-7", image="x.png", source="s", split="test", aus={"AU1": 1},
                       vqa=[VQAPair("q3", "Is the upper lip raised?", "no", au="AU10")])
    with pytest.raises(ValueError, match=r"record face-7: its Q3 question asks about AU10"):
        _au_rows([(asks_au10, asks_au10.vqa[0])], data_aus([asks_au10]), torch.tensor([True]))
    unknown = Record(id="face-8", image="x.png", source="s", split="test", aus={"AU1": 0, "AU3": 1})
    with pytest.raises(ValueError, match=r"record face-8: unknown action unit\(s\) \['AU3'\]"):
        data_aus([asks_au10, unknown])
    assert data_aus([unknown.__class__(id="a", image="x", source="s", split="t", aus={"AU12": 1, "AU2": 0}),
                     asks_au10]) == ["AU1", "AU2", "AU12"]


def test_an_encoder_handed_on_by_an_init_checkpoint_is_the_one_evaluated(stage_run, tmp_path):
    """A frozen-encoder stage saves no vision.*: the fine-tuned encoder an init checkpoint handed on
    (training/stages.py `init_from_stage_checkpoints`) must come from that file again, as in training, not from
    the original."""
    from expvl.configs import load_config, save_config
    from expvl.configs.schema import RunConfig
    from expvl.training.runs import open_run

    ck = torch.load(stage_run["dir"] / "stage3" / "final.ckpt", map_location="cpu", weights_only=True)
    original = open_run(stage_run["dir"]).encoder.state_dict()
    tuned = {f"model.vision.{k}": v + 0.5 if v.is_floating_point() else v for k, v in original.items()}
    init = tmp_path / "stage2_final.ckpt"  # as an Exp-BLIP step 2 with vision.freeze=false writes it
    torch.save({"state_dict": {**ck["state_dict"], **tuned}, "stage": "caption"}, init)
    cfg = load_config(RunConfig, [stage_run["dir"] / "config.yaml"])
    cfg.pretrained.init_checkpoints = [str(init)]
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "stage3").mkdir()
    shutil.copy(stage_run["dir"] / "stage3" / "final.ckpt", run_dir / "stage3" / "final.ckpt")

    model = open_run(run_dir).stage_model("instruct")
    ours = model.state_dict()
    for key, t in tuned.items():
        torch.testing.assert_close(ours[key.removeprefix("model.")], t, rtol=0, atol=0, msg=key)
    for key, t in ck["state_dict"].items():  # and what the stage trained, from its own final.ckpt
        torch.testing.assert_close(ours[key.removeprefix("model.")], t, rtol=0, atol=0, msg=key)


def test_a_stage2_run_gets_its_probes_and_attention_maps_and_no_questions(request, tmp_path):
    import expvl
    from expvl.evaluation.evaluate import evaluate
    from expvl.training.runs import open_run
    from train import main

    base = request.getfixturevalue("parts")
    run_dir = tmp_path / "caption"
    main(stage_args(base, run_dir, "caption", "stage2.max_steps=1"))
    metrics = evaluate(open_run(run_dir))
    assert set(metrics["probes"]) == {"au", "emotion"} and "au_vqa_scoring" not in metrics
    assert "no stage-3 (instruct) model" in metrics["meta"]["not evaluated"] and metrics["headline"] == {}
    assert (run_dir / "eval" / "attention.png").exists() and (run_dir / "eval" / "report.md").exists()
    with pytest.raises(ValueError, match=r"no 'instruct' model to ask with \(it trained \['caption'\]\)"):
        expvl.load(run_dir).ask(tmp_path / "face.png", "Is the inner brow raised?")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("command", [[], ["ask", "--image", "face.png", "--question", "Is the brow raised?"]])
def test_eval_py_refuses_a_gpu_the_machine_lacks_before_loading_anything(command, tmp_path, capsys):
    from eval import main

    with pytest.raises(SystemExit) as exit_:  # the run folder need not exist: nothing is read first
        main([*command[:1], "--run", str(tmp_path / "absent"), *command[1:], "--device", "cuda"])
    assert exit_.value.code == 2 and "--device: device 'cuda': torch sees no CUDA device" in capsys.readouterr().err


def test_device_names():
    from expvl.training.runs import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RuntimeError, match="gpu0"):  # torch's own message names the bad string
        resolve_device("gpu0")


def test_an_unknown_split_is_named_with_the_ones_there_are(stage_run):
    from expvl.evaluation.evaluate import evaluate
    from expvl.training.runs import open_run

    with pytest.raises(ValueError, match=r"no split 'tset' in .*data: its splits are \['test', 'train', 'val'\]"):
        evaluate(open_run(stage_run["dir"]), split="tset")
