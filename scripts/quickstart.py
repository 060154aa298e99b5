#!/usr/bin/env python
"""The main job, end to end, on a small default (``configs/quickstart.yaml``):

    python scripts/quickstart.py [--preset tiny] [run.name=mine] [key=value ...]

Runs every stage in order in one run folder. A stage whose artifact is already complete is
skipped, so a killed quickstart resumes where it stopped. Prints where the results are.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import cli_config
from common.runs import RunDir, run_path
from envs.collect import format_card
from envs.dataset import CARD_NAME, collect_folder
from scripts import collect, evaluate, train_dreamer, train_dynamics
from scripts.config import Config, validate


@dataclass
class Stage:
    """One stage of the pipeline: its name, the artifact that marks it complete, how to run it."""

    name: str
    artifact: Callable[[object], Path]
    run: Callable[[object, RunDir], object]


def _train_tokenizer(cfg, run_dir: RunDir) -> dict:
    """The tokenizer stage (what ``scripts/train_tokenizer.py`` does) on the run's dataset."""
    from envs.dataset import EpisodeDataset, training_folder
    from worldmodel.train_tokenizer import train

    folder = training_folder(cfg)
    dataset = EpisodeDataset.load(folder)
    train_set, val_set = dataset.split(cfg.data.val_fraction, seed=cfg.run.seed)
    return train(cfg, run_dir, train_set.frames, None if val_set is None else val_set.frames,
                 data_source=str(folder.resolve()))


# Each stage's artifact is written atomically and last, so "it exists" means "the stage finished".
STAGES = [
    Stage("collect", lambda cfg: collect_folder(cfg) / CARD_NAME, collect.run),
    Stage("tokenizer", lambda cfg: run_path(cfg) / "tokenizer.pt", _train_tokenizer),
    Stage("dynamics", lambda cfg: run_path(cfg) / "dynamics.pt", train_dynamics.run),
    Stage("dreamer", lambda cfg: run_path(cfg) / "dreamer.pt", train_dreamer.run),
    Stage("evaluate", lambda cfg: run_path(cfg) / "report.md", evaluate.run),
]


def main(argv: list[str] | None = None) -> dict:
    cfg = cli_config(Config, argv, extra_files=("quickstart.yaml",), validate=validate)
    run_dir = RunDir(cfg, "quickstart", argv)
    print(f"quickstart: run folder {run_dir.path}")
    timings = {}
    for stage in STAGES:
        if stage.artifact(cfg).exists():
            print(f"[{stage.name}] complete ({stage.artifact(cfg)}), skipped")
            continue
        print(f"[{stage.name}] running")
        start = time.perf_counter()
        stage.run(cfg, run_dir)
        timings[stage.name] = round(time.perf_counter() - start, 2)
        print(f"[{stage.name}] done in {timings[stage.name]:.1f} s")
    print()
    print(format_card(collect.run(cfg, run_dir)))
    metrics = json.loads((run_dir / "metrics.json").read_text()).get("evaluate", {})
    print(f"\nagent vs world model: {evaluate.headline(metrics)}")
    print(f"report: {run_dir / 'report.md'}")
    print(f"\nresults: {run_dir.path}")
    return {"run_dir": str(run_dir.path), "timings": timings, "evaluate": metrics}


if __name__ == "__main__":
    main()
