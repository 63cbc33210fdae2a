"""Shared fixtures. Tests run on CPU with tiny configs; nothing is downloaded."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _nondeterministic_by_default():
    """Every test starts with torch's deterministic algorithms off, as a fresh process does: a Trainer
    built in-process with trainer.deterministic (tiny.yaml) turns them on for the whole process, and
    kernel choices (models/kernel_choice.py) are then never measured."""
    torch.use_deterministic_algorithms(False)
    yield


@pytest.fixture
def happy_jpg() -> Path:
    """The real face photo in ../shared/data (skips cleanly where that folder is absent)."""
    path = SHARED_DATA / "happy.jpg"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path
