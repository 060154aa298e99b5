#!/usr/bin/env python
"""Stage: train the Dreamer-style agent in the run's world model (imagination only).

    python scripts/train_dreamer.py [--env doorkey-6x6] [--preset tiny] [key=value ...]

Needs ``<run>/tokenizer.pt``, ``<run>/dynamics.pt`` and the dataset. Writes ``<run>/dreamer.pt``
(a policy: ``agents.policy.load_policy``) and ``<run>/dreamer_checkpoints/``; a killed run resumes
from ``<run>/dreamer.resume.pt``. ``--help`` lists every config key.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.train_dreamer import train
from common.config import cli_config
from common.runs import RunDir
from scripts.config import Config, validate


def run(cfg, run_dir: RunDir) -> dict:
    """Train (or resume, or skip) the agent; return the stage's metrics."""
    return train(cfg, run_dir)


def main(argv: list[str] | None = None) -> dict:
    cfg = cli_config(Config, argv, validate=validate)
    return run(cfg, RunDir(cfg, "dreamer", argv))


if __name__ == "__main__":
    main()
