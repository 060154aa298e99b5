#!/usr/bin/env python
"""Benchmark: the whole route (collect → tokenizer → dynamics → Dreamer agent → evaluation) from
random-policy data, for several seeds, on DoorKey-5x5 (10k frames) and DoorKey-6x6 (50k frames).

    python benchmarks/agent.py [--envs doorkey-5x5,doorkey-6x6] [--seeds 0,1,2] [--root /tmp/bench] [key=value ...]

Each (env, seed) is one quickstart run in its own folder (the seed moves the collection seeds, the
training seeds and nothing else; evaluation episodes are the same for every seed). Prints one JSON
object last, keyed by env id, also written to ``benchmarks/results/agent.json``::

    {"MiniGrid-DoorKey-5x5-v0": {"normalized_score": mean over seeds, "normalized_score_seeds": [...],
      "dataset_frames": ..., "imagined_return": ..., "real_return": ..., "return_gap": ...,
      "spearman": ..., "kendall": ..., "wall_seconds": mean per seed, ...}, ...}

Targets (issue 5): normalized_score >= 0.9 on both, return_gap <= 0.05, spearman >= 0.9.
``key=value`` arguments go to every run (e.g. ``dreamer.updates=800``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Random-policy frames per env (the budgets).
FRAMES = {"doorkey-5x5": 10_000, "doorkey-6x6": 50_000}
# The quickstart's settings, but for what the larger env needs: its 6x6 agent takes the Dreamer
# stage's default of 1500 updates (DreamerConfig), the quickstart's 5x5 one 600.
ENV_OVERRIDES = {"doorkey-6x6": ["dreamer.updates=1500"]}
HEADLINE = ("normalized_score", "imagined_return", "real_return", "return_gap", "spearman", "kendall")


def run_one(env: str, seed: int, root: Path, extra: list[str]) -> dict:
    """One quickstart run of ``env`` with ``seed``; returns its evaluate metrics, frames and wall time."""
    from scripts import quickstart

    name = f"agent-{env}-seed{seed}"
    argv = ["--env", env, f"run.root={root}", f"run.name={name}", f"run.seed={seed}",
            f"collect.seed={seed * 100_000}", f"collect.num_steps={FRAMES[env]}", "collect.policy_mix=random:1",
            "run.progress=false", *ENV_OVERRIDES.get(env, []), *extra]
    started = time.perf_counter()
    quickstart.main(argv)
    wall = time.perf_counter() - started
    metrics = json.loads((root / name / "metrics.json").read_text())
    return {"evaluate": metrics["evaluate"], "frames": metrics.get("dataset", {}).get("frames"), "wall_seconds": wall}


def summarise(env_id: str, results: list[dict]) -> dict:
    """Mean over seeds of the headline numbers, the per-seed scores and their spread."""
    def values(key: str) -> list[float]:
        return [r["evaluate"][key] for r in results if r["evaluate"].get(key) is not None]

    out: dict = {}
    for key in HEADLINE:
        got = values(key)
        out[key] = round(statistics.fmean(got), 4) if got else None
    scores = values("normalized_score")
    out["normalized_score_seeds"] = [round(s, 4) for s in scores]
    out["normalized_score_std"] = round(statistics.pstdev(scores), 4) if len(scores) > 1 else 0.0
    out["normalized_score_min"] = round(min(scores), 4) if scores else None
    out["return_gap_seeds"] = [round(g, 4) for g in values("return_gap")]
    out["spearman_seeds"] = [round(s, 4) for s in values("spearman")]
    out["num_policies"] = min(r["evaluate"].get("num_policies", 0) for r in results)
    out["dataset_frames"] = max(r["frames"] or 0 for r in results)
    out["wall_seconds"] = round(statistics.fmean(r["wall_seconds"] for r in results), 1)
    out["wall_seconds_seeds"] = [round(r["wall_seconds"], 1) for r in results]
    out["seeds"] = len(results)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="doorkey-5x5,doorkey-6x6", help="env presets (configs/env/NAME.yaml)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3 for the spread)")
    parser.add_argument("--root", default=str(ROOT / "benchmarks" / "results" / "runs"), help="parent of the run folders")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "agent.json"), help="where the JSON goes")
    args, extra = parser.parse_known_args(argv)
    from common.atomic import atomic_write_json
    from envs.make import normalize_env_id

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    root = Path(args.root)
    summary: dict = {}
    for env in (e.strip() for e in args.envs.split(",") if e.strip()):
        if env not in FRAMES:
            raise SystemExit(f"no frame budget for env preset '{env}': choose from {sorted(FRAMES)}")
        results = [run_one(env, seed, root, extra) for seed in seeds]
        env_id = normalize_env_id(env.replace("doorkey", "DoorKey"))
        summary[env_id] = summarise(env_id, results)
        summary[env_id]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
        atomic_write_json(args.out, summary)  # after every env: a killed benchmark keeps what it finished
    print(json.dumps(summary, sort_keys=True))
    return summary


if __name__ == "__main__":
    main()
