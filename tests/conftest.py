"""Shared test set-up: headless, offline, one thread (two pytest workers never fight for cores)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def run_root(tmp_path):
    """A temporary parent folder for run folders (``run.root=...``)."""
    return tmp_path / "runs"
