#!/usr/bin/env python
"""Benchmark: planning to a goal frame in the world model, acting in the real env (agents/planner.py).

    python benchmarks/planning.py [--envs doorkey-6x6,fourrooms] [--frames 20000] [--tasks 200] [--root DIR]

Per env: trains the world model from scratch (fixed seeds) on ``--frames`` frames of ``--mix``,
collects held-out episodes (other env seeds, ``HELD_OUT_MIX``) and draws ``--tasks`` tasks from them:
start at a frame t of an episode (the real env put into its symbolic state), reach frame t + k
(k uniform in 1..``--max-gap``, within the episode). The planner searches the model
breadth-first and acts by model-predictive control, re-planning when the real frame differs from
the imagined one. The yardstick is ``envs.oracle.plan_to_state`` (BFS in the true rules); tasks it
finds already solved (k steps that changed nothing) are skipped.

Prints progress and one JSON object last (also ``benchmarks/results/planning.json``):
``{env_id: {"tasks", "success", "path_ratio", "path_ratio_max", "ms_per_plan", "ms_per_search",
"replans_per_episode", "frames_expanded", "model": {...}}, "machine": {...}}``. ``path_ratio``: the
mean over solved tasks of real steps / shortest steps; ``ms_per_plan``: planning time per real
step (amortised over each episode, one CPU thread).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import finish, machine

HELD_OUT_MIX = "epsilon_oracle@0.5:1"  # episodes that go places (goals past keys and doors), not straight there


def log(message: str) -> None:
    print(f"[planning {time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_world_model(env: str, frames: int, mix: str, root: Path, dynamics_steps: int):
    """collect -> tokenizer -> dynamics through the stages' own run(cfg); returns (cfg, run path)."""
    from common.config import cli_config
    from common.runs import RunDir
    from scripts import collect, train_dynamics, train_tokenizer
    from scripts.config import Config, validate

    argv = ["--env", env, f"run.root={root}", f"run.name={env}", "run.progress=false", "run.threads=1",
            f"collect.num_steps={frames}", f"collect.policy_mix={mix}", f"dynamics.steps={dynamics_steps}"]
    cfg = cli_config(Config, argv, validate=validate)
    run = RunDir(cfg, "benchmark", argv).lock()
    try:
        for stage in (collect, train_tokenizer, train_dynamics):
            stage.run(cfg, run)
    finally:
        run.unlock()
    held = cli_config(Config, ["--env", env, f"run.root={root}", f"run.name={env}-tasks", "run.progress=false",
                               "collect.num_steps=4000", f"collect.policy_mix={HELD_OUT_MIX}", "collect.seed=900000"],
                      validate=validate)
    held_run = RunDir(held, "benchmark", []).lock()
    try:
        collect.run(held, held_run)
    finally:
        held_run.unlock()
    return cfg, run.path, held_run.path / "dataset"


def draw_tasks(dataset, env_id: str, count: int, max_gap: int, seed: int = 0) -> list[dict]:
    """(start state, goal frame, goal state, shortest length) of ``count`` tasks from held-out episodes."""
    import numpy as np

    from envs.oracle import plan_to_state
    from envs.state import StateCodec

    codec = StateCodec.for_card(dataset.card, state_size=int(dataset.arrays["states"].shape[1]))
    rng = np.random.default_rng(seed)
    tasks, tries = [], 0
    while len(tasks) < count and tries < 50 * count:
        tries += 1
        episode = int(rng.integers(dataset.num_episodes))
        length = int(dataset.episode_lengths[episode])
        if length < 1:
            continue
        t = int(rng.integers(0, length))
        k = int(rng.integers(1, min(max_gap, length - t) + 1))
        start, goal = dataset.episode_starts[episode] + t, dataset.episode_starts[episode] + t + k
        states = dataset.arrays["states"]
        shortest = plan_to_state(codec.decode(states[start]), codec.decode(states[goal]))
        if not shortest:  # already there (the k steps changed nothing), or not reachable by the rules
            continue
        tasks.append({"start": states[start], "goal_frame": dataset.arrays["frames"][goal], "shortest": len(shortest)})
    return tasks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--envs", default="doorkey-6x6,fourrooms", help="env presets, comma-separated")
    parser.add_argument("--frames", type=int, default=20_000, help="training frames of the world model")
    parser.add_argument("--mix", default="random:0.5,epsilon_oracle@0.3:0.5", help="training behaviour mix")
    parser.add_argument("--dynamics-steps", type=int, default=3000, help="dynamics training steps")
    parser.add_argument("--tasks", type=int, default=200, help="tasks per env")
    parser.add_argument("--max-gap", type=int, default=100, help="most steps between start and goal frame")
    parser.add_argument("--root", default="/tmp/bench-planning", help="where the runs go")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from agents.planner import GoalPlanner, reach_goal
    from envs.dataset import EpisodeDataset
    from envs.make import env_from_state
    from worldmodel.imagine import load_world_model

    torch.set_num_threads(1)
    out: dict = {}
    for env in args.envs.split(","):
        started = time.perf_counter()
        cfg, run_path, held_path = train_world_model(env, args.frames, args.mix, Path(args.root), args.dynamics_steps)
        log(f"{env}: world model in {time.perf_counter() - started:.0f} s")
        world_model = load_world_model(run_dir=run_path)
        planner = GoalPlanner(world_model)
        tasks = draw_tasks(EpisodeDataset.load(held_path), str(cfg.env.id), args.tasks, args.max_gap)
        solved, ratios, steps, plan_seconds, replans, searches = 0, [], 0, 0.0, [], 0
        for i, task in enumerate(tasks):
            planner.corrections.clear()  # every task on its own: what one episode learnt is not carried over
            real = env_from_state(str(cfg.env.id), task["start"], obs=str(cfg.env.obs), tile_size=int(cfg.env.tile_size))
            episode = reach_goal(real, planner, task["goal_frame"], real.render(), max_steps=4 * task["shortest"] + 20)
            solved += episode.success
            if episode.success:
                ratios.append(episode.steps / task["shortest"])
            steps += max(episode.steps, 1)
            plan_seconds += episode.plan_seconds
            replans.append(episode.replans)
            searches += episode.plans
            if (i + 1) % 50 == 0:
                log(f"{env}: {i + 1}/{len(tasks)} tasks, success {solved / (i + 1):.3f}")
        metrics = json.loads((run_path / "metrics.json").read_text())
        out[str(cfg.env.id)] = {
            "tasks": len(tasks),
            "success": solved / max(len(tasks), 1),
            "path_ratio": float(np.mean(ratios)) if ratios else None,
            "path_ratio_max": float(np.max(ratios)) if ratios else None,
            "ms_per_plan": 1000 * plan_seconds / max(steps, 1),
            "ms_per_search": 1000 * plan_seconds / max(searches, 1),
            "replans_per_episode": float(np.mean(replans)) if replans else None,
            "shortest_mean": float(np.mean([t["shortest"] for t in tasks])) if tasks else None,
            "shortest_max": int(np.max([t["shortest"] for t in tasks])) if tasks else None,
            "model": {k: metrics.get("dynamics", {}).get(k) for k in ("frame_exact_1step", "train_steps")},
        }
        log(f"{env}: {out[str(cfg.env.id)]}")
    out["machine"] = machine()
    finish("planning", out)
    return out


if __name__ == "__main__":
    main()
