"""Files a user may have been sent never run code when they load.

A torch checkpoint is a pickle, and unpickling may call any function the file names. Each kind of file
the project reads is written here with a poisoned entry whose unpickling would create a marker file
(`_Poison`), and loaded by the code path a command uses: a stage's final.ckpt (`expvl.load(...).ask`,
what `eval.py ask` calls), a VL-FAU part's final.ckpt (`explain`), `pretrained.init_checkpoints`, a
Lightning last.ckpt a rerun resumes from, a LAVIS checkpoint, a Hugging Face folder's
pytorch_model.bin, and the image encoder's weights. Each must fail with an error naming the file, and
the marker must not exist.

Every test runs with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, the variable torch's own error message
suggests to "fix" a refused file: it turns every `torch.load` that does not say `weights_only=True`
into an unrestricted one, so only explicit reads pass. `test_the_poison_is_real` shows that such a
read does run the file's code.
"""

import lightning as L
import pytest
import torch
from PIL import Image

import expvl
from expvl.configs import load_config, save_config
from expvl.configs.schema import PretrainedConfig, RunConfig, VLFAURecipe
from expvl.models.convert import CheckpointError, load_hf_llm, read_weights
from expvl.models.convert.blip2_parts import load_qformer_checkpoint
from expvl.models.convert.hf_export import save_hf_llama
from expvl.models.llm import LLaMA, LLMConfig
from expvl.models.qformer import QFormer, QFormerConfig
from expvl.models.vision import VisionConfig, VisionEncoder, build_clip
from expvl.training import runs, vlfau
from expvl.training.checkpoints import init_from_checkpoints, load_trained
from expvl.training.run_folder import Step, trainer
from expvl.training.single_stage import init_stage_weights


class _Poison:
    """Unpickled, it creates `marker`: proof that the file's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(autouse=True)
def _unrestricted_default(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "the_file_ran_code"
    yield path
    assert not path.exists(), "a poisoned file ran its code while loading"


def _poisoned(path, marker, **entries):
    """A torch file holding `entries` and one poisoned value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**entries, "extra": _Poison(marker)}, path)
    return path


def _checkpoint(path, marker, **entries):
    """A Lightning-style checkpoint (state_dict, stage, global_step) with a poisoned entry."""
    return _poisoned(path, marker, state_dict={"model.weight": torch.zeros(2, 2)}, stage="instruct",
                     global_step=3, **entries)


def _names(path):
    return str(path).replace(".", r"\.")


def test_the_poison_is_real(tmp_path):
    marker = tmp_path / "ran"
    path = _poisoned(tmp_path / "a.pt", marker)
    with pytest.warns(UserWarning, match="forcing weights_only=False"):
        torch.load(path)  # no weights_only: with the variable set, an unrestricted read
    assert marker.exists()


def test_a_stage_checkpoint_asked_through_the_api(tmp_path, marker, monkeypatch):
    run_dir = tmp_path / "run"
    save_config(load_config(RunConfig, ["tiny"], [f"run_dir={run_dir}"]), run_dir / "config.yaml")
    final = _checkpoint(run_dir / "stage3" / "final.ckpt", marker)
    # the parts around the stage model are not what is tested: stand-ins, so that only final.ckpt is read
    for part in ("tokenizers", "encoder", "llm"):
        monkeypatch.setattr(runs.Blip2Run, part, property(lambda self: None))
    monkeypatch.setattr(runs, "build_stage_model", lambda *a, **k: torch.nn.Linear(2, 2, bias=False))
    monkeypatch.setattr(runs, "trainable", lambda model: ("weight",))
    face = tmp_path / "face.png"
    Image.new("RGB", (64, 64)).save(face)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {_names(final)}: UnpicklingError"):
        expvl.load(run_dir).ask(face, "Are the inner brows raised?")


def test_a_vlfau_checkpoint_explained_through_the_api(tmp_path, marker, monkeypatch):
    run_dir = tmp_path / "vlfau"
    recipe = load_config(VLFAURecipe, ["vlfau_synthfacs"], [f"run_dir={run_dir}"])
    save_config(recipe, run_dir / "config.yaml")
    final = _checkpoint(run_dir / "main" / "final.ckpt", marker)
    for part in ("parts", "encoder"):
        monkeypatch.setattr(vlfau.VLFAURun, part, property(lambda self: None))
    monkeypatch.setattr(vlfau, "build_model", lambda *a, **k: (torch.nn.Linear(2, 2, bias=False), None))
    monkeypatch.setattr(vlfau, "trainable_prefixes", lambda model: ("weight",))
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {_names(final)}"):
        expvl.load(run_dir).explain(Image.new("RGB", (64, 64)))


def test_init_checkpoints_of_a_recipe(tmp_path, marker):
    path = _checkpoint(tmp_path / "stage1" / "final.ckpt", marker)
    model = torch.nn.Linear(2, 2, bias=False)
    with pytest.raises(CheckpointError, match=_names(path)):
        init_stage_weights(model, PretrainedConfig(init_checkpoints=[str(path)]))
    with pytest.raises(CheckpointError, match=_names(path)):
        init_from_checkpoints(model, [(path, ("weight",))])
    with pytest.raises(CheckpointError, match=_names(path)):
        load_trained(model, path, ("weight",))


def test_a_poisoned_last_ckpt_is_moved_aside_and_never_resumed(tmp_path, marker, caplog):
    step = Step(tmp_path, "stage3", {"lr": 1})
    last = _checkpoint(step.dir / "checkpoints" / "last.ckpt", marker)
    assert step.resume_path() is None
    assert not last.exists() and (last.parent / "last.ckpt.unreadable").exists()
    assert f"cannot read checkpoint {last}" in caplog.text and "no readable checkpoint" in caplog.text


def test_lightning_itself_is_told_to_read_weights_only(tmp_path, marker):
    last = _checkpoint(tmp_path / "last.ckpt", marker)
    cfg = load_config(RunConfig, ["tiny"], ["trainer.accelerator=cpu", "trainer.logger=none"])

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    with pytest.raises(Exception, match="Weights only load failed"):  # what training/*.py pass to fit
        trainer(cfg, tmp_path / "step", max_steps=1, grad_clip=0.0).fit(Module(), data, ckpt_path=str(last),
                                                                         weights_only=True)


def test_a_lavis_checkpoint(tmp_path, marker):
    path = _poisoned(tmp_path / "blip2_pretrained.pth", marker, model={"Qformer.x": torch.zeros(1)})
    qformer = QFormer(QFormerConfig.from_name("tiny"))
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {_names(path)}: UnpicklingError"):
        load_qformer_checkpoint(qformer, path, "lavis")
    model = torch.nn.Module()
    model.qformer = qformer
    with pytest.raises(CheckpointError, match=_names(path)):
        init_stage_weights(model, PretrainedConfig(lavis_checkpoint=str(path)))


def test_a_hugging_face_folder_s_pytorch_model_bin(tmp_path, marker):
    folder = tmp_path / "llama"
    save_hf_llama(LLaMA(LLMConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=16)),
                  folder)
    (folder / "model.safetensors").unlink()
    weights = _poisoned(folder / "pytorch_model.bin", marker, **{"model.norm.weight": torch.ones(8)})
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {_names(weights)}"):
        read_weights(folder)
    with pytest.raises(CheckpointError, match=_names(weights)):
        load_hf_llm(folder)


@pytest.mark.parametrize("layout", ["open_clip", "eva"])
def test_the_image_encoder_s_weights(tmp_path, marker, layout):
    state = {"visual.conv1.weight": torch.zeros(1)} if layout == "open_clip" else \
        {"patch_embed.proj.weight": torch.zeros(1), "blocks.0.attn.qkv.weight": torch.zeros(1)}
    path = _poisoned(tmp_path / "encoder.pt", marker, **state)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {_names(path)}: UnpicklingError"):
        VisionEncoder(VisionConfig.from_name("tiny-vit", pretrained=str(path)))
    with pytest.raises(CheckpointError, match=_names(path)):
        build_clip(VisionConfig.from_name("tiny-vit", pretrained=str(path)))


def test_an_open_clip_training_checkpoint_still_loads(tmp_path):
    """open_clip's own loader is no longer called on a path: what it did to the state dict still happens
    (the training checkpoint's "state_dict", DDP's "module." prefix)."""
    cfg = VisionConfig.from_name("tiny-vit")
    torch.manual_seed(1)
    clip = build_clip(cfg)
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, path)
    loaded = VisionEncoder(VisionConfig.from_name("tiny-vit", pretrained=str(path)))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), VisionEncoder.from_clip(cfg, clip)(x))
