#!/usr/bin/env python
"""Stage: evaluate a set of policies in the real env and in the run's world model.

    python scripts/evaluate.py [--preset tiny] [evaluate.policies=dreamer,random,oracle] [key=value ...]

Needs the world model (``<run>/tokenizer.pt``, ``<run>/dynamics.pt``) and the saved policies it
names. Writes ``<run>/report.md``, ``metrics.json`` (section ``evaluate``) and ``<run>/media/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.evaluate import REPORT_NAME, evaluate
from common.atomic import ArtifactError
from common.runs import RunDir, run_path
from common.stage import Stage, config_fields, run_stage
from scripts.stages import dynamics_id, main_for, policy_ids, tokenizer_id

STAGE = Stage(
    name="evaluate",
    outputs=lambda cfg: [run_path(cfg) / REPORT_NAME],
    identity=lambda cfg: {
        "config": config_fields(cfg, ["env", "evaluate"]) | {"run.seed": int(cfg.run.seed)},
        "inputs": {"tokenizer": tokenizer_id(cfg), "dynamics": dynamics_id(cfg), **policy_ids(cfg)},
    },
    body=lambda cfg, run_dir: _evaluate(cfg, run_dir),
    sections=("env", "evaluate"),
)


def _evaluate(cfg, run_dir: RunDir) -> dict:
    """The body: an outside policy that breaks its contract while acting (an illegal action) ends
    the stage with its message and exit 1, like an artifact that cannot be trusted."""
    from agents.outside import PolicyError

    try:
        return evaluate(cfg, run_dir)
    except PolicyError as error:
        raise ArtifactError(str(error)) from None


def run(cfg, run_dir: RunDir) -> dict:
    """The stage contract: evaluate unless the report is complete and of this config and these policies."""
    return run_stage(STAGE, cfg, run_dir)


def warnings(metrics: dict) -> str:
    """The evaluation's trust flags as lines to print (empty when the model and the real env agree)."""
    lines = [f"WARNING: {flag}\n" for flag in metrics.get("flags", [])]
    if not metrics.get("trusted", True):
        lines.insert(0, "WARNING: do not trust this run's imagined figures: the world model and the real env disagree\n")
    return "".join(lines)


def headline(metrics: dict) -> str:
    """One line of the numbers that matter."""
    keys = ("normalized_score", "real_return", "imagined_return", "return_gap", "spearman", "kendall", "mae",
            "regret_at_1", "mmrv", "num_policies")
    return ", ".join(f"{k} {metrics[k]:.3f}" if isinstance(metrics.get(k), float) else f"{k} {metrics.get(k)}"
                     for k in keys if k in metrics)


def main(argv: list[str] | None = None) -> dict:
    def show(cfg, metrics) -> None:
        print(f"evaluate: {headline(metrics)}")
        print(warnings(metrics), end="")
        print(f"report: {run_path(cfg) / REPORT_NAME}")

    return main_for(STAGE, argv, after=show)


if __name__ == "__main__":
    main()
