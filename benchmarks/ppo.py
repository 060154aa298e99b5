#!/usr/bin/env python
"""Benchmark: the model-free PPO baseline from scratch, 3 seeds, on DoorKey-5x5 (others by argument).

    python benchmarks/ppo.py [--envs doorkey-5x5] [--seeds 0,1,2] [--steps 30000] [--root /tmp/bench-ppo] [key=value ...]

Per env, one tokenizer (random-policy frames, the agent benchmark's data budget) that every seed's
policy reads its tokens from; per seed, one ``scripts/train_ppo.py`` run from scratch that evaluates
the policy every ``ppo.eval_every`` updates on ``ppo.eval_episodes`` real episodes (env seeds
``evaluate.seed + i``, the same for every seed; evaluation steps are not counted). Prints progress,
then one JSON object last, keyed by env id, also written to ``benchmarks/results/ppo.json``::

    {"MiniGrid-DoorKey-5x5-v0": {"normalized_score": mean over seeds at the end,
      "normalized_score_seeds": [...], "frames_to_0.9": the most over seeds (null if a seed never gets there),
      "frames_to_0.9_seeds": [...], "normalized_score_spread": {"min", "max", "std"}, "wall_seconds": mean per seed,
      "curves": {seed: [[env_steps, normalized_score], ...]}, ...}, "machine": {...}}

``frames_to_0.9`` of a seed: the real env steps at the first evaluation scoring >= 0.9 whose next
evaluation also does. Target (issue 20): <= 30k on every seed. ``key=value`` goes to every run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import finish, machine  # noqa: E402

# Random-policy frames for each env's tokenizer (enough to show every tile the env draws).
TOKENIZER_FRAMES = {"doorkey-5x5": 10_000}
DEFAULT_TOKENIZER_FRAMES = 20_000
TARGET = 0.9


def tokenizer_run(env: str, root: Path) -> Path:
    """Collect random frames and train the tokenizer once per env; returns its run folder."""
    from scripts import collect, train_tokenizer

    name = f"ppo-tokenizer-{env}"
    argv = ["--env", env, f"run.root={root}", f"run.name={name}", "run.progress=false", "collect.policy_mix=random:1",
            f"collect.num_steps={TOKENIZER_FRAMES.get(env, DEFAULT_TOKENIZER_FRAMES)}"]
    collect.main(argv)
    train_tokenizer.main(argv)
    return root / name


def frames_to(history: list[dict], target: float) -> int | None:
    """Env steps at the first evaluation >= target whose next evaluation is also >= target."""
    for current, following in zip(history, history[1:]):
        if current["normalized_score"] >= target and following["normalized_score"] >= target:
            return int(current["env_steps"])
    return None


def run_one(env: str, seed: int, root: Path, tokenizer_folder: Path, steps: int, extra: list[str]) -> dict:
    from agents.policy import read_checkpoint
    from scripts import train_ppo

    name = f"ppo-{env}-seed{seed}"
    argv = ["--env", env, f"run.root={root}", f"run.name={name}", f"run.seed={seed}", "run.progress=false",
            f"ppo.tokenizer={tokenizer_folder}", f"ppo.total_env_steps={steps}", *extra]
    started = time.perf_counter()
    metrics = train_ppo.main(argv)
    wall = time.perf_counter() - started
    history = read_checkpoint(root / name / train_ppo.FINAL_NAME)["history"]
    return {"metrics": metrics, "history": history, "wall_seconds": float(metrics.get("train_seconds", wall))}


def summarise(results: dict[int, dict]) -> dict:
    scores = [r["metrics"]["normalized_score"] for r in results.values()]
    reached = [frames_to(r["history"], TARGET) for r in results.values()]
    first = next(iter(results.values()))["metrics"]
    return {
        "normalized_score": statistics.fmean(scores),
        "normalized_score_seeds": scores,
        "normalized_score_spread": {"min": min(scores), "max": max(scores),
                                    "std": statistics.pstdev(scores) if len(scores) > 1 else 0.0},
        "frames_to_0.9": None if any(r is None for r in reached) else max(reached),
        "frames_to_0.9_seeds": reached,
        "env_steps": first["env_steps"],
        "random_return": first["random_return"], "oracle_return": first["oracle_return"],
        "eval_episodes": first["eval_episodes"],
        "wall_seconds": statistics.fmean(r["wall_seconds"] for r in results.values()),
        "wall_seconds_seeds": [r["wall_seconds"] for r in results.values()],
        "curves": {str(seed): [[h["env_steps"], h["normalized_score"]] for h in r["history"]] for seed, r in results.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="doorkey-5x5", help="comma-separated env presets (configs/env/)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--steps", type=int, default=30_000, help="real env steps per run")
    parser.add_argument("--root", default="/tmp/bench-ppo", help="parent folder of the benchmark's run folders")
    args, extra = parser.parse_known_args()
    root = Path(args.root)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out: dict = {"machine": {**machine(), "load_at_start": os.getloadavg()[:3]}, "steps": args.steps, "overrides": extra}
    for env in [e.strip() for e in args.envs.split(",") if e.strip()]:
        tokenizer_folder = tokenizer_run(env, root)
        results = {}
        for seed in seeds:
            results[seed] = run_one(env, seed, root, tokenizer_folder, args.steps, extra)
            r = results[seed]
            print(f"[bench] {env} seed {seed}: normalised {r['metrics']['normalized_score']:.3f}, frames_to_0.9 "
                  f"{frames_to(r['history'], TARGET)}, {r['wall_seconds']:.0f} s", flush=True)
        out[results_key(env)] = summarise(results)
    out["machine"]["load_at_end"] = os.getloadavg()[:3]
    finish("ppo", out)


def results_key(env: str) -> str:
    """The env id an env preset names (``doorkey-5x5`` -> ``MiniGrid-DoorKey-5x5-v0``)."""
    from omegaconf import OmegaConf

    return str(OmegaConf.load(ROOT / "configs" / "env" / f"{env}.yaml").env.id)


if __name__ == "__main__":
    main()
