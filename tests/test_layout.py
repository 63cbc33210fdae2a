"""The rules of the house, checked on the source: data flows one way, and everything is installed.

- no import circle between files (imports inside functions and under `if TYPE_CHECKING:` count too);
- the library packages (models, datamodules, synthesis, vocab) never import training or evaluation,
  and evaluation never imports training: it is handed an opened run;
- models/ is plain PyTorch: no Lightning;
- vocab/ imports nothing else of the project;
- at the top of the repository only train.py and eval.py are modules; every folder with an
  `__init__.py` is a package pyproject.toml installs under `expvl`, and nothing edits sys.path;
- every package imports from another directory, as a user's script would.
"""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ("models", "datamodules", "synthesis", "vocab")
SOURCE_DIRS = ("expvl", *LIBRARY, "configs", "training", "evaluation")


def _installed() -> dict[str, str]:
    """package name -> folder, from pyproject.toml."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = cfg["package-dir"]
    out = {}
    for name in cfg["packages"]:
        top = next(k for k in sorted(roots, key=len, reverse=True) if name == k or name.startswith(k + "."))
        out[name] = str(Path(roots[top], *name[len(top):].split(".")[1:]))
    return out


def _modules() -> dict[str, Path]:
    """dotted name (as installed) -> file, for every module of the project's packages and the two CLIs."""
    mods = {"train": REPO / "train.py", "eval": REPO / "eval.py"}
    for name, folder in _installed().items():
        for f in sorted((REPO / folder).glob("*.py")):
            mods[name if f.name == "__init__.py" else f"{name}.{f.stem}"] = f
    return mods


def _imports(path: Path, package: str) -> list[str]:
    """Every module name `path` imports, anywhere in the file (functions, TYPE_CHECKING blocks included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for imported in _imports(path, package):
            target = imported
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def _package(module: str) -> str:
    """expvl.models.convert.eva -> models; train -> train."""
    parts = module.split(".")
    return parts[1] if parts[0] == "expvl" and len(parts) > 1 else parts[0]


def test_no_import_circle_between_files():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():  # the check above could pass by finding nothing
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_data_flows_one_way():
    forbidden = {**{p: {"training", "evaluation", "train", "eval"} for p in LIBRARY},
                 "evaluation": {"training", "train", "eval"}, "configs": {"training", "evaluation"}}
    bad = [(m, t) for m, targets in _graph().items() for t in targets
           if _package(t) in forbidden.get(_package(m), set())]
    assert bad == []
    vocab_out = [(m, t) for m, targets in _graph().items() if _package(m) == "vocab"
                 for t in targets if _package(t) != "vocab"]
    assert vocab_out == []


def test_models_are_plain_pytorch():
    lightning = [name for name, path in _modules().items() if _package(name) == "models"
                 and any(i.split(".")[0] in ("lightning", "pytorch_lightning") for i in _imports(path, name))]
    assert lightning == []


def test_only_the_two_entry_points_sit_at_the_top():
    assert sorted(p.name for p in REPO.glob("*.py")) == ["eval.py", "train.py"]


def test_every_package_folder_is_installed_and_nothing_edits_sys_path():
    installed = set(_installed().values())
    folders = {str(init.parent.relative_to(REPO)) for d in SOURCE_DIRS for init in (REPO / d).rglob("__init__.py")}
    assert folders - installed == set() and installed - folders == set()
    touching = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py")
                if ".venv" not in p.parts and "sys.path" in p.read_text() and p.name != "test_layout.py"]
    assert touching == []


@pytest.mark.slow
def test_every_package_imports_from_another_directory(tmp_path):
    (tmp_path / "models").mkdir()  # a user's own package of a generic name must not shadow ours
    (tmp_path / "models" / "__init__.py").write_text("raise ImportError('the user models package was imported')\n")
    names = sorted(_installed())
    code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names) + \
        "import expvl\nassert callable(expvl.load)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
