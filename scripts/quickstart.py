#!/usr/bin/env python
"""The main job, end to end, on a small default (``configs/quickstart.yaml``):

    python scripts/quickstart.py [--preset tiny] [run.name=mine] [key=value ...]

Runs every stage in order in one run folder, each through the stage contract
(:func:`common.stage.run_stage`): a stage whose artifact is complete and of the same identity is
skipped, so a killed quickstart resumes where it stopped and a changed ``dreamer.*`` key reruns
only the Dreamer stage and the evaluation. ``quickstart.vagen=true`` adds the VAGEN agent to the
chain (and to the evaluated policies). Prints where the results are.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import cli_config
from common.runs import RunDir
from common.stage import Stage, guarded, run_stage
from envs.collect import format_card
from envs.dataset import collect_folder, read_card
from scripts import collect, evaluate, train_dreamer, train_dynamics, train_tokenizer, train_vagen
from scripts.config import Config, validate

STAGES: list[Stage] = [collect.STAGE, train_tokenizer.STAGE, train_dynamics.STAGE, train_dreamer.STAGE,
                       evaluate.STAGE]


def stages_for(cfg) -> list[Stage]:
    """The chain this config runs: the default stages; with ``quickstart.vagen`` the VAGEN agent
    trains before the evaluation, which then scores it beside the others."""
    if cfg.quickstart.vagen:
        names = [p.strip() for p in str(cfg.evaluate.policies).split(",")]
        if "vagen" not in names:
            cfg.evaluate.policies = ",".join(names[:1] + ["vagen"] + names[1:])
        return STAGES[:-1] + [train_vagen.STAGE, STAGES[-1]]
    return list(STAGES)


def main(argv: list[str] | None = None) -> dict:
    cfg = cli_config(Config, argv, extra_files=("quickstart.yaml",), validate=validate)
    with guarded():
        run_dir = RunDir(cfg, "quickstart", argv).lock()
        try:
            print(f"quickstart: run folder {run_dir.path}")
            for stage in stages_for(cfg):
                run_stage(stage, cfg, run_dir)
        finally:
            run_dir.unlock()
    print()
    print(format_card(read_card(collect_folder(cfg))))
    metrics = json.loads((run_dir / "metrics.json").read_text()).get("evaluate", {})
    print(f"\nagent vs world model: {evaluate.headline(metrics)}")
    print(evaluate.warnings(metrics), end="")
    print(f"report: {run_dir / 'report.md'}")
    print(f"\nresults: {run_dir.path}")
    return {"run_dir": str(run_dir.path), "evaluate": metrics}


if __name__ == "__main__":
    main()
