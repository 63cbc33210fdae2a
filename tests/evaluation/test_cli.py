"""eval.py as a user meets it: what `--help` says, and how a mistake ends.

A mistake the user can fix must end in one line on stderr naming what is wrong and exit code 2 (argparse's
code for usage errors, which eval.py already used for a missing GPU), never in a traceback.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from expvl.configs import save_config
from expvl.configs.schema import RunConfig

REPO = Path(__file__).resolve().parents[2]


def _eval_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "eval.py"), *args], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def blip2_run(tmp_path):
    """A BLIP-2 run folder as far as the run loader needs it to tell the system (models load lazily)."""
    save_config(RunConfig(), tmp_path / "run" / "config.yaml")
    return tmp_path / "run"


@pytest.fixture
def face(tmp_path):
    path = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (150, 120, 100)).save(path)
    return path


def test_help_lists_every_command():
    out = _eval_py("--help")
    assert out.returncode == 0
    for command in ("ask", "explain", "compare"):
        assert f"\n  {command} " in out.stdout, out.stdout  # a line of its own in the command listing


def test_every_option_of_every_command_has_help():
    from eval import COMMANDS, parsers

    found = parsers()
    assert set(found) == {"", *COMMANDS}
    for name, parser in found.items():
        for action in parser._actions:  # argparse keeps no public list of a parser's options
            assert action.help and action.help != argparse.SUPPRESS, f"{name or 'eval'}: {action.dest} has no help"


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert out.stderr.count("\n") == 1 and out.stderr.endswith("\n"), out.stderr
    return out.stderr


def test_explain_on_a_blip2_run_says_explain_is_for_vlfau_and_to_ask(blip2_run, face):
    err = _one_line_error(_eval_py("explain", "--run", str(blip2_run), "--image", str(face)))
    assert err.startswith("python eval.py explain: error: ")
    assert "explain is for VL-FAU runs" in err and f"python eval.py ask --run {blip2_run}" in err


def test_a_missing_image_is_named(blip2_run, tmp_path):
    missing = tmp_path / "no_such_face.jpg"
    err = _one_line_error(_eval_py("explain", "--run", str(blip2_run), "--image", str(missing)))
    assert f"--image {missing}: no such file" in err


def _main_error(capsys, argv: list[str]) -> str:
    """eval.py's error in this process (no interpreter start-up): exit 2, one line on stderr."""
    from eval import main

    with pytest.raises(SystemExit) as exit_:  # anything else would end `python eval.py` in a traceback
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    return err


def test_ask_names_a_missing_image_too(blip2_run, tmp_path, capsys):
    missing = tmp_path / "no_such_face.jpg"
    err = _main_error(capsys, ["ask", "--run", str(blip2_run), "--image", str(missing), "--question", "Why?"])
    assert err == f"python eval.py ask: error: --image {missing}: no such file\n"


def test_a_missing_run_or_metrics_file_is_one_line(tmp_path, capsys):
    assert "is not a run folder" in _main_error(capsys, ["--run", str(tmp_path / "absent")])
    assert "eval/metrics.json not found" in _main_error(capsys, ["compare", str(tmp_path)])
