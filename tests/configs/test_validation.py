"""Values that used to train forever, write an untrained stage as finished, crash inside Lightning or
leak a secret are refused when the config loads, with one line naming the key (configs/schema.py,
configs/__init__.py)."""

import subprocess
import sys

import pytest

from expvl.configs import ConfigError, load_config
from expvl.configs.schema import RunConfig, VLFAURecipe
from tests.conftest import REPO

# (override, what the message says): each was accepted before, and then failed late or not at all
BAD_OVERRIDES = [
    ("stage3.max_steps=-1", r"stage3\.max_steps must be >= 1 .*got -1"),  # trained forever
    ("stage2.max_steps=0", r"stage2\.max_steps must be >= 1 \(a stage of no steps would be saved as finished"),
    ("bootstrap.llm_steps=-1", r"bootstrap\.llm_steps must be >= 1, got -1"),
    ("bootstrap.encoder_steps=0", r"bootstrap\.encoder_steps must be >= 1, got 0"),
    ("stage1.batch_size=0", r"stage1\.batch_size must be >= 1, got 0"),
    ("trainer.val_check_interval=0", r"trainer\.val_check_interval must be >= 1, got 0"),  # ZeroDivisionError
    ("trainer.log_every_n_steps=0", r"trainer\.log_every_n_steps must be >= 1, got 0"),
    ("trainer.ckpt_every_n_steps=0", r"trainer\.ckpt_every_n_steps must be >= 1, got 0"),
    ("trainer.limit_val_batches=-1", r"trainer\.limit_val_batches must be >= 0, got -1"),
    ("eval.limit=-1", r"eval\.limit must be >= 0 \(0 = all records\), got -1"),  # evaluated 31 of 32
    ("eval.batch_size=0", r"eval\.batch_size must be >= 1, got 0"),
    ("stage1=5", r"override 'stage1=5': 'stage1' is a section: give its keys under it \(e\.g\. stage1\.max_steps\)"),
    ("stage1.optim=3", r"'stage1\.optim' is a section: give its keys under it \(e\.g\. stage1\.optim\.lr\), not 3"),
]


@pytest.mark.parametrize("override, match", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_a_bad_value_is_a_config_error_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RunConfig, ["tiny"], [override])


@pytest.mark.parametrize("text, match", [
    ("stage1: 5\n", r"bad\.yaml: 'stage1' is a section: give its keys under it .*not 5"),  # was a TypeError
    ("stage1:\n  optim: [1, 2]\n", r"bad\.yaml: 'stage1\.optim' is a section"),
    ("trainer: [1]\n", r"bad\.yaml: 'trainer' is a section"),
    ("- stage1\n- stage2\n", r"bad\.yaml: a config file holds keys \(`key: value` lines\), not a list"),
])
def test_a_yaml_file_of_the_wrong_shape_is_named(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(RunConfig, ["tiny", path])


def test_a_vlfau_recipe_of_no_steps_is_refused():
    with pytest.raises(ConfigError, match=r"max_steps must be >= 1 \(a part of no steps"):
        load_config(VLFAURecipe, ["vlfau_synthfacs"], ["max_steps=0"])


def test_the_values_that_are_fine_stay_fine():
    cfg = load_config(RunConfig, ["tiny"], ["stage3.max_steps=1", "trainer.limit_val_batches=0", "eval.limit=0",
                                            "synthesis.text.llm.api_key_env=MY_SERVICE_API_KEY_2"])
    assert cfg.stage3.max_steps == 1 and cfg.synthesis.text.llm.api_key_env == "MY_SERVICE_API_KEY_2"


SECRETS = ["sk-proj-Xq3vB9kLmN2pQrStUvWxYz0123456789abcd", "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
           "AKIAIOSFODNN7EXAMPLE"]


@pytest.mark.parametrize("secret", SECRETS)
def test_a_key_pasted_where_its_variable_s_name_goes_is_refused_and_never_repeated(secret):
    with pytest.raises(ConfigError, match=r"synthesis\.text\.llm\.api_key_env names the environment variable") as e:
        load_config(RunConfig, ["tiny"], [f"synthesis.text.llm.api_key_env={secret}"])
    assert secret not in str(e.value) and secret[:8] not in str(e.value)


def test_train_py_with_a_pasted_key_writes_and_prints_nothing_of_it(tmp_path):
    secret = SECRETS[0]
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", "tiny", f"run_dir={run_dir}",
                           f"synthesis.text.llm.api_key_env={secret}"], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "config error: synthesis.text.llm.api_key_env" in done.stderr
    assert secret not in done.stdout + done.stderr and not run_dir.exists()
