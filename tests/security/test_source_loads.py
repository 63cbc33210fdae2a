"""Checked on the source: every read of a file that may come from elsewhere refuses to run code.

The project's own code (everything but tests/) may call `torch.load` only with `weights_only=True`
written out (torch's default can be switched off by an environment variable), and a Lightning `fit`
that resumes (`ckpt_path=`) likewise, since Lightning hands its `weights_only` to torch as it is.
Loaders that unpickle whatever a file says (`pickle.load`, `torch.jit.load`, numpy with
`allow_pickle=True`, open_clip's `load_checkpoint`, which retries a refused file unrestricted) are not
called at all. No file anywhere, tests included, passes `weights_only=False`.
"""

import ast
import subprocess

import pytest

from tests.conftest import REPO

UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("jit", "load"), ("open_clip", "load_checkpoint"),
              ("dill", "load"), ("joblib", "load")}


def _calls(tree: ast.AST):
    """(owner, name, keyword arguments, line) of every call: `torch.load(...)` -> ("torch", "load", ...)."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, owner = node.func, ""
        if isinstance(func, ast.Attribute):
            base = func.value
            owner = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        yield owner, name, {k.arg: k.value for k in node.keywords}, node.lineno


def _true(kwargs: dict, key: str) -> bool:
    return isinstance(kwargs.get(key), ast.Constant) and kwargs[key].value is True


def unsafe_loads(source: str, *, library: bool = True) -> list[str]:
    """What in `source` could unpickle code: one "line: call" per finding."""
    found = []
    for owner, name, kwargs, line in _calls(ast.parse(source)):
        if "weights_only" in kwargs and isinstance(kwargs["weights_only"], ast.Constant) \
                and kwargs["weights_only"].value is False:
            found.append(f"{line}: weights_only=False")
        if not library:
            continue
        if (owner, name) == ("torch", "load") and not _true(kwargs, "weights_only"):
            found.append(f"{line}: torch.load without weights_only=True")
        elif name == "fit" and "ckpt_path" in kwargs and not _true(kwargs, "weights_only"):
            found.append(f"{line}: fit(ckpt_path=...) without weights_only=True")
        elif (owner, name) in UNPICKLERS or (name == "load" and _true(kwargs, "allow_pickle")):
            found.append(f"{line}: {owner}.{name}")
    return found


def _sources() -> list:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    return [REPO / f for f in listed if (REPO / f).exists()]


def test_no_file_is_read_in_a_way_that_runs_its_code():
    sources = _sources()
    assert any(f.name == "checkpoints.py" for f in sources) and len(sources) > 100  # the listing is real
    found = [f"{f.relative_to(REPO)}:{finding}" for f in sources
             for finding in unsafe_loads(f.read_text(), library=f.relative_to(REPO).parts[0] != "tests")]
    assert found == []


@pytest.mark.parametrize("line, finding", [
    ("torch.load(p)", "torch.load without weights_only=True"),
    ("torch.load(p, weights_only=flag)", "torch.load without weights_only=True"),
    ("x = f(weights_only=False)", "weights_only=False"),
    ("tr.fit(lit, loader, ckpt_path=step.resume_path())", "fit(ckpt_path=...) without weights_only=True"),
    ("pickle.loads(blob)", "pickle.loads"),
    ("torch.jit.load(p)", "jit.load"),
    ("np.load(p, allow_pickle=True)", "np.load"),
    ("open_clip.load_checkpoint(model, p)", "open_clip.load_checkpoint"),
])
def test_the_check_finds_each_kind(line, finding):
    assert [f.split(": ", 1)[1] for f in unsafe_loads(line)] == [finding]


def test_the_check_passes_what_is_safe():
    safe = ("torch.load(p, map_location='cpu', weights_only=True, mmap=True)\n"
            "tr.fit(lit, datamodule=d, ckpt_path=step.resume_path(), weights_only=True)\n"
            "np.load(p, mmap_mode='r')\ntr.fit(lit, loader)\n")
    assert unsafe_loads(safe) == []
    assert unsafe_loads("pickle.loads(blob)", library=False) == []  # a test unpickling what it pickled itself
    assert unsafe_loads("torch.load(p, weights_only=False)", library=False) == ["1: weights_only=False"]
