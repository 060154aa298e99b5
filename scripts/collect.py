#!/usr/bin/env python
"""Stage 1: roll the behaviour-policy mix in MiniGrid and write the offline dataset.

    python scripts/collect.py [--env doorkey-6x6] [--preset tiny] [key=value ...]

Writes ``<run>/dataset/`` (shards + card.json; ``collect.path`` to put it elsewhere), resumes a
killed collection, and prints the dataset card. ``--help`` lists every config key.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import cli_config
from common.runs import RunDir
from common.seeding import seed_everything
from envs.collect import collect, format_card
from envs.dataset import collect_folder
from scripts.config import Config, validate


def run(cfg, run_dir: RunDir) -> dict:
    """Collect (or finish) the run's dataset and return its card."""
    seed_everything(cfg.run.seed)
    card = collect(cfg.env, cfg.collect, collect_folder(cfg), progress=cfg.run.progress)
    run_dir.update_metrics("dataset", {k: card[k] for k in ("env_id", "episodes", "steps", "frames")}
                           | {"return_mean": card["returns"]["return_mean"],
                              "success_rate": card["returns"]["success_rate"]})
    return card


def main(argv: list[str] | None = None) -> dict:
    cfg = cli_config(Config, argv, validate=validate)
    card = run(cfg, RunDir(cfg, "collect", argv))
    print(format_card(card))
    print(f"dataset written to {collect_folder(cfg)}")
    return card


if __name__ == "__main__":
    main()
