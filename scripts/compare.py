#!/usr/bin/env python
"""Several evaluated runs (other envs, views, seeds or world models) in one table and one scatter.

    python scripts/compare.py runs/dk5 runs/dk6 runs/dk6-partial [--out compare.png]

Reads each run folder's ``metrics.json`` (section ``evaluate``, written by scripts/evaluate.py)
and ``config.yaml``; prints one Markdown row per run (env, view, policies, episodes, the agent's
normalised score, the imagined-vs-real metrics with their 95% intervals where the run has them) and
writes one scatter of imagined vs real return of every policy of every run, one colour per run.
Read-only: it takes no lock and writes only ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (column, metrics.json key) of the table, in order
COLUMNS = (("score", "normalized_score"), ("spearman", "spearman"), ("kendall", "kendall"), ("pearson", "pearson"),
           ("mae", "mae"), ("mae_norm", "mae_normalized"), ("regret@1", "regret_at_1"), ("regret@3", "regret_at_3"),
           ("mmrv", "mmrv"), ("return_gap", "return_gap"))


def load_run(folder: Path) -> dict[str, Any]:
    """One evaluated run: its label, env, view and ``evaluate`` metrics; a clear error if it has none."""
    from omegaconf import OmegaConf

    from common.atomic import ArtifactError

    path = folder / "metrics.json"
    try:
        metrics = json.loads(path.read_text())["evaluate"]
    except FileNotFoundError:
        raise ArtifactError(f"{folder} has no metrics.json: run scripts/evaluate.py on it first") from None
    except (KeyError, ValueError, OSError) as error:
        raise ArtifactError(f"{path} holds no readable evaluate section ({error}): rerun scripts/evaluate.py") from None
    config = OmegaConf.load(folder / "config.yaml") if (folder / "config.yaml").is_file() else OmegaConf.create({})
    env = config.get("env", {})
    return {"label": folder.name, "env": str(env.get("id", "?")), "obs": str(env.get("obs", "?")), "metrics": metrics}


def cell(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "—"
    interval = metrics.get(f"{key}_ci")
    if isinstance(interval, list) and len(interval) == 2 and all(isinstance(v, (int, float)) for v in interval):
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
    return f"{value:.3f}"


def table(runs: list[dict]) -> str:
    """A Markdown table, one row per run."""
    head = ["run", "env", "view", "policies", "episodes", *(name for name, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        m = run["metrics"]
        row = [run["label"], run["env"], run["obs"], str(m.get("num_policies", len(m.get("policies", [])))),
               str(m.get("episodes", "?")), *(cell(m, key) for _, key in COLUMNS)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="compare.py", description="Several evaluated runs in one table and one scatter.")
    parser.add_argument("runs", nargs="+", type=Path, help="run folders that scripts/evaluate.py has evaluated")
    parser.add_argument("--out", type=Path, default=Path("compare.png"), help="where the scatter PNG goes")
    args = parser.parse_args(argv)
    from agents.evaluate import grouped_scatter_plot
    from common.runs import write_png
    from common.stage import guarded

    with guarded():
        runs = [load_run(folder) for folder in args.runs]
        labels = [run["label"] for run in runs]
        if len(set(labels)) < len(labels):  # same folder name under different roots
            for run, folder in zip(runs, args.runs):
                run["label"] = str(folder)
        text = table(runs)
        print(text)
        write_png(args.out, grouped_scatter_plot({run["label"]: run["metrics"].get("policies", []) for run in runs}))
        print(f"scatter: {args.out}")
    return text


if __name__ == "__main__":
    main()
