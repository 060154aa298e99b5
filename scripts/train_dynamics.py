#!/usr/bin/env python
"""Stage 3: train the action-conditioned dynamics model on the run's tokenised dataset.

    python scripts/train_dynamics.py [--env doorkey-6x6] [--preset tiny] [key=value ...]
    torchrun --nproc_per_node=2 scripts/train_dynamics.py --preset tiny run.name=x   # DDP, same result shape

Needs the collect and tokenizer stages in the same run folder (``<run>/dataset/``,
``<run>/tokenizer.pt``). Writes ``<run>/dynamics.pt``, resumes from ``<run>/dynamics.resume.pt``,
logs to ``<run>/tb/dynamics`` and ``<run>/media/dynamics_open_loop.gif`` (real | imagined).
``--help`` lists every config key.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import cli_config
from common.runs import RunDir
from scripts.config import Config, validate
from worldmodel.train_dynamics import distributed_rank, train


def run(cfg, run_dir: RunDir | None) -> dict:
    """Train the run's dynamics model; return its validation metrics (rank 0)."""
    return train(cfg, run_dir)


def main(argv: list[str] | None = None) -> dict:
    cfg = cli_config(Config, argv, validate=validate)
    # Under torchrun only rank 0 writes the run folder's records.
    run_dir = RunDir(cfg, "dynamics", argv) if distributed_rank() == 0 else None
    return run(cfg, run_dir)


if __name__ == "__main__":
    main()
