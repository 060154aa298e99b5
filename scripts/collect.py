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

from common.runs import RunDir
from common.seeding import seed_everything
from common.stage import Stage, run_stage
from envs.collect import collect, dataset_identity, format_card
from envs.dataset import collect_folder, dataset_content, read_card
from scripts.stages import main_for


def body(cfg, run_dir: RunDir) -> dict:
    """Collect (or finish) the run's dataset and return its card."""
    seed_everything(cfg.run.seed)
    card = collect(cfg.env, cfg.collect, collect_folder(cfg), progress=cfg.run.progress)
    run_dir.update_metrics("dataset", {k: card[k] for k in ("env_id", "episodes", "steps", "frames")}
                           | {"return_mean": card["returns"]["return_mean"],
                              "success_rate": card["returns"]["success_rate"]})
    return card


STAGE = Stage(
    name="collect",
    outputs=lambda cfg: [collect_folder(cfg)],
    identity=lambda cfg: {"config": dataset_identity(cfg.env, cfg.collect), "inputs": {}},
    body=body,
    sections=("env", "collect"),
    content=lambda cfg: dataset_content(collect_folder(cfg)),
    resumable=True,  # collection resumes at its first missing shard
)


def run(cfg, run_dir: RunDir) -> dict:
    """The stage contract: collect unless the dataset is complete and of this config."""
    return run_stage(STAGE, cfg, run_dir)


def main(argv: list[str] | None = None) -> dict:
    def show(cfg, _metrics) -> None:
        print(format_card(read_card(collect_folder(cfg))))
        print(f"dataset written to {collect_folder(cfg)}")

    return main_for(STAGE, argv, after=show)


if __name__ == "__main__":
    main()
