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
from common.config import cli_config
from common.runs import RunDir
from scripts.config import Config, validate


def run(cfg, run_dir: RunDir) -> dict:
    """Evaluate the configured policies; return the ``evaluate`` metrics."""
    return evaluate(cfg, run_dir)


def headline(metrics: dict) -> str:
    """One line of the numbers that matter."""
    keys = ("normalized_score", "real_return", "imagined_return", "return_gap", "spearman", "kendall", "num_policies")
    return ", ".join(f"{k} {metrics[k]:.3f}" if isinstance(metrics.get(k), float) else f"{k} {metrics.get(k)}"
                     for k in keys if k in metrics)


def main(argv: list[str] | None = None) -> dict:
    cfg = cli_config(Config, argv, validate=validate)
    run_dir = RunDir(cfg, "evaluate", argv)
    metrics = run(cfg, run_dir)
    print(f"evaluate: {headline(metrics)}")
    print(f"report: {run_dir / REPORT_NAME}")
    return metrics


if __name__ == "__main__":
    main()
