#!/usr/bin/env python
"""The main job, end to end, on a small default (``configs/quickstart.yaml``):

    python scripts/quickstart.py [--preset tiny] [run.name=mine] [key=value ...]

Runs every stage in order in one run folder. A stage whose artifact is already complete is
skipped, so a killed quickstart resumes where it stopped. Prints where the results are.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import cli_config
from common.runs import RunDir
from envs.collect import format_card
from envs.dataset import CARD_NAME, collect_folder
from scripts import collect
from scripts.config import Config, validate


@dataclass
class Stage:
    """One stage of the pipeline: its name, the artifact that marks it complete, how to run it."""

    name: str
    artifact: Callable[[object], Path]
    run: Callable[[object, RunDir], object]


STAGES = [
    Stage("collect", lambda cfg: collect_folder(cfg) / CARD_NAME, collect.run),
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
    print(f"\nresults: {run_dir.path}")
    return {"run_dir": str(run_dir.path), "timings": timings}


if __name__ == "__main__":
    main()
