#!/usr/bin/env python
"""Benchmark: the whole route (collect → tokenizer → dynamics → Dreamer agent → evaluation) from
uniform-random-policy data, for several seeds, per env preset and view.

    python benchmarks/agent.py [--envs doorkey-5x5,doorkey-6x6] [--views full,partial] [--seeds 0,1,2]
                               [--frames N] [--ladder] [--ppo-steps N] [--root /tmp/bench] [key=value ...]

Each (env, view, frames, seed) is one quickstart run in its own folder (the seed moves the collection
seeds, the training seeds and nothing else; evaluation episodes are the same for every seed). Prints
one JSON object last, also written to ``benchmarks/results/agent.json``::

    {"MiniGrid-DoorKey-6x6-v0": {"full": {"normalized_score": mean over seeds, "normalized_score_seeds": [...],
      "normalized_score_ci": [low, high], "dataset_frames": ..., "return_gap": ..., "spearman": ...,
      "frames_to_0.9": ..., "ppo_frames_to_0.9": ..., "ppo_normalized_score_at_same_frames": ...,
      "wall_seconds": mean per seed, "stage_seconds": {stage: mean per seed}, ...}}, "machine": {...}}

- ``normalized_score_ci``: 95% bootstrap interval, resampling seeds and, within each, the evaluation
  episodes (the agent's, the random policy's and the oracle's returns on the same env seeds, replayed
  from the run folder exactly as the evaluation played them).
- ``frames_to_0.9`` (with ``--ladder``): the smallest rung of 2k, 5k, 10k, 20k, 50k, 100k, 200k
  random frames from which every seed scores >= 0.9, climbing from ``--frames``' rung or the first
  and stopping there, up to ``--ladder-top`` (null without ``--ladder``, or when no rung reaches
  it); every frame the route reads counts (tokenizer, dynamics and start frames read one dataset).
- ``ppo_frames_to_0.9`` and ``ppo_normalized_score_at_same_frames`` (with ``--ppo-steps N``): the
  in-repo PPO (benchmarks/ppo.py's runs, same seeds) trained N real env steps: the steps at its
  first evaluation >= 0.9 held at the next, and its score at the last evaluation within
  ``dataset_frames`` real steps.

Targets (issue 20): normalized_score >= 0.9 on every seed, return_gap <= 0.05, frames_to_0.9 <=
ppo_frames_to_0.9 / 2.5. ``key=value`` arguments go to every run (e.g. ``dreamer.updates=800``).
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

from benchmarks._common import machine  # noqa: E402

# Random-policy frames per (env preset, view) when neither --frames nor --ladder says otherwise.
FRAMES = {("doorkey-5x5", "full"): 10_000, ("doorkey-6x6", "full"): 50_000, ("lavagap-s7", "full"): 50_000,
          ("doorkey-5x5", "partial"): 10_000, ("doorkey-6x6", "partial"): 100_000}
LADDER = (2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000)
TARGET = 0.9
STAGES = ("collect", "tokenizer", "dynamics", "dreamer", "evaluate")
BOOTSTRAP = 2000


def run_one(env: str, view: str, frames: int, seed: int, root: Path, extra: list[str]) -> dict:
    """One quickstart run; returns its evaluate metrics, per-stage seconds, wall time and the
    per-episode real returns of the agent and the two reference policies."""
    from scripts import quickstart

    name = f"agent-{env}-{view}-{frames}-seed{seed}"
    argv = ["--env", env, f"env.obs={view}", f"run.root={root}", f"run.name={name}", f"run.seed={seed}",
            f"collect.seed={seed * 100_000}", f"collect.num_steps={frames}", "collect.policy_mix=random:1",
            "run.progress=false", *extra]
    started = time.perf_counter()
    quickstart.main(argv)
    wall = time.perf_counter() - started
    metrics = json.loads((root / name / "metrics.json").read_text())
    return {"evaluate": metrics["evaluate"], "frames": metrics.get("dataset", {}).get("frames"), "wall_seconds": wall,
            "stage_seconds": stage_seconds(root / name), "episodes": episode_returns(argv, root / name)}


def stage_seconds(run_path: Path) -> dict[str, float]:
    """Seconds each stage of the run took, from its stage records (absent: skipped or unrecorded)."""
    out = {}
    for stage in STAGES:
        record = run_path / "stages" / f"{stage}.json"
        if record.is_file():
            seconds = json.loads(record.read_text()).get("seconds")
            if seconds is not None:
                out[stage] = float(seconds)
    return out


def episode_returns(argv: list[str], run_path: Path) -> dict[str, list[float]]:
    """The real per-episode returns of ``dreamer``, ``random`` and ``oracle``, replayed as the
    evaluation stage played them (same env seeds, same policy seeds)."""
    from agents.evaluate import resolve_policies, run_real
    from common.config import load_config
    from common.seeding import derive_seed
    from scripts.config import Config
    from worldmodel.tokenizer import load_tokenizer

    cfg = load_config(Config, argv, extra_files=("quickstart.yaml",))
    stage = cfg.evaluate
    policies = resolve_policies(str(stage.policies), run_path, str(cfg.env.id), int(stage.max_checkpoints))
    seeds = [int(stage.seed) + i for i in range(int(stage.episodes))]
    tokenizer = load_tokenizer(run_path / "tokenizer.pt")
    out = {}
    for index, policy in enumerate(policies):
        if policy.name in ("dreamer", "random", "oracle"):
            seed = derive_seed(int(cfg.run.seed), int(stage.seed), index)
            out[policy.name] = run_real(policy, cfg.env, seeds, tokenizer, seed).returns.tolist()
    return out


def score_interval(episodes: list[dict[str, list[float]]], resamples: int = BOOTSTRAP, seed: int = 0) -> list[float] | None:
    """95% percentile bootstrap interval of the mean normalised score: seeds resampled, and within
    each the episodes (the same env seeds for the agent, random and oracle)."""
    import numpy as np

    runs = [{k: np.asarray(v, float) for k, v in e.items()} for e in episodes if {"dreamer", "random", "oracle"} <= set(e)]
    if not runs:
        return None
    rng = np.random.default_rng(seed)
    scores = np.empty(resamples)
    for r in range(resamples):
        picked = rng.integers(len(runs), size=len(runs))
        values = []
        for i in picked:
            run = runs[i]
            rows = rng.integers(len(run["dreamer"]), size=len(run["dreamer"]))
            low, high = run["random"][rows].mean(), run["oracle"][rows].mean()
            values.append((run["dreamer"][rows].mean() - low) / (high - low) if high != low else 0.0)
        scores[r] = float(np.mean(values))
    return [round(float(np.percentile(scores, 2.5)), 4), round(float(np.percentile(scores, 97.5)), 4)]


def summarise(results: list[dict]) -> dict:
    """Mean over seeds of the headline numbers, the per-seed values and their spread."""
    def values(key: str) -> list[float]:
        return [r["evaluate"][key] for r in results if r["evaluate"].get(key) is not None]

    out: dict = {}
    for key in ("normalized_score", "imagined_return", "real_return", "return_gap", "spearman", "kendall"):
        got = values(key)
        out[key] = round(statistics.fmean(got), 4) if got else None
    scores = values("normalized_score")
    out["normalized_score_seeds"] = [round(s, 4) for s in scores]
    out["normalized_score_ci"] = score_interval([r["episodes"] for r in results])
    out["normalized_score_min"] = round(min(scores), 4) if scores else None
    out["return_gap_seeds"] = [round(g, 4) for g in values("return_gap")]
    out["spearman_seeds"] = [round(s, 4) for s in values("spearman")]
    out["flagged_seeds"] = [i for i, g in enumerate(values("return_gap")) if g > 0.1]  # the report's headline flag
    out["num_policies"] = min(r["evaluate"].get("num_policies", 0) for r in results)
    out["dataset_frames"] = max(r["frames"] or 0 for r in results)
    out["wall_seconds"] = round(statistics.fmean(r["wall_seconds"] for r in results), 1)
    out["wall_seconds_seeds"] = [round(r["wall_seconds"], 1) for r in results]
    stages = [s for s in STAGES if all(s in r["stage_seconds"] for r in results)]
    out["stage_seconds"] = {s: round(statistics.fmean(r["stage_seconds"][s] for r in results), 1) for s in stages}
    out["seeds"] = len(results)
    return out


def ppo_columns(env: str, seeds: list[int], steps: int, dataset_frames: int, root: Path) -> dict:
    """PPO from scratch on the real env (benchmarks/ppo.py's runs): frames to 0.9 (the most over
    seeds, null if a seed never gets there) and the mean score within ``dataset_frames`` steps."""
    from benchmarks import ppo

    tokenizer_folder = ppo.tokenizer_run(env, root)
    reached, at_same = [], []
    for seed in seeds:
        history = ppo.run_one(env, seed, root, tokenizer_folder, steps, [])["history"]
        reached.append(ppo.frames_to(history, TARGET))
        within = [h["normalized_score"] for h in history if h["env_steps"] <= dataset_frames]
        at_same.append(within[-1] if within else None)
    known = [s for s in at_same if s is not None]
    return {"ppo_frames_to_0.9": None if any(r is None for r in reached) else max(reached),
            "ppo_frames_to_0.9_seeds": reached, "ppo_steps": steps,
            "ppo_normalized_score_at_same_frames": round(statistics.fmean(known), 4) if known else None}


def rungs(low: int | None, high: int) -> list[int]:
    """The ladder's rungs from ``low`` (the first rung without it) up to ``high``."""
    for value, name in ((low, "--frames"), (high, "--ladder-top")):
        if value is not None and value not in LADDER:
            raise SystemExit(f"{name} {value} is not a ladder rung: choose from {list(LADDER)}")
    return [f for f in LADDER if (low is None or f >= low) and f <= high]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="doorkey-5x5,doorkey-6x6", help="env presets (configs/env/NAME.yaml)")
    parser.add_argument("--views", default="full", help="comma-separated views: full (top-down) and/or partial (egocentric)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3 for the spread)")
    parser.add_argument("--frames", type=int, default=None, help="random-policy frames (default: the env's budget)")
    parser.add_argument("--ladder", action="store_true", help="climb the frame ladder to the first rung where every seed reaches 0.9")
    parser.add_argument("--ladder-top", type=int, default=LADDER[-1], help="the highest rung the ladder climbs to")
    parser.add_argument("--ppo-steps", type=int, default=0, help="also train the in-repo PPO this many real steps per seed (0: no PPO columns)")
    parser.add_argument("--root", default=str(ROOT / "benchmarks" / "results" / "runs"), help="parent of the run folders")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "agent.json"), help="where the JSON goes")
    args, extra = parser.parse_known_args(argv)
    from benchmarks.ppo import results_key
    from common.atomic import atomic_write_json

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    views = [v.strip() for v in args.views.split(",") if v.strip()]
    if not seeds or any(v not in ("full", "partial") for v in views):
        raise SystemExit(f"--seeds needs at least one seed and --views only full or partial, got {args.seeds!r}, {args.views!r}")
    root = Path(args.root)
    summary: dict = {"machine": {**machine(), "load_at_start": list(os.getloadavg())}}
    for env in (e.strip() for e in args.envs.split(",") if e.strip()):
        env_id = results_key(env)  # the preset's env id (configs/env/NAME.yaml)
        for view in views:
            if not args.ladder and args.frames is None and (env, view) not in FRAMES:
                raise SystemExit(f"no frame budget for '{env}' {view}: give --frames or --ladder ({sorted(FRAMES)})")
            row, reached = {}, None
            for frames in rungs(args.frames, args.ladder_top) if args.ladder else [args.frames or FRAMES[(env, view)]]:
                row = summarise([run_one(env, view, frames, seed, root, extra) for seed in seeds])
                print(f"[bench] {env} {view} {frames} frames: normalised {row['normalized_score_seeds']}", flush=True)
                if min(row["normalized_score_seeds"], default=0.0) >= TARGET:
                    reached = frames
                    break
            row["frames_to_0.9"] = reached if args.ladder else None
            if args.ppo_steps > 0:
                row.update(ppo_columns(env, seeds, args.ppo_steps, row["dataset_frames"], root))
            row["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
            summary.setdefault(env_id, {})[view] = row
            atomic_write_json(args.out, summary)  # after every row: a killed benchmark keeps what it finished
    summary["machine"]["load_at_end"] = list(os.getloadavg())
    atomic_write_json(args.out, summary)
    print(json.dumps(summary, sort_keys=True))
    return summary


if __name__ == "__main__":
    main()
