#!/usr/bin/env python
"""Benchmark: the world model across the suite, per env and view, trained from scratch.

    python benchmarks/world_models.py [--envs doorkey-5x5,...] [--views full,partial] [--minutes 10]
                                      [--rollouts 128] [key=value ...]

For every env and view: collect the dataset ``DATA`` states for the env (at most 100k frames; a
uniform-random + epsilon-oracle mix, so the data reaches the goal and the doors), train the
tokenizer and the dynamics model through the stage contract with the stage defaults and a
``--minutes`` time box (fixed seeds, 1 thread), then measure on the held-out 10% of episodes:

- ``frame_exact_1step`` / ``frame_exact_1step_determined`` / ``state_head_accuracy_determined`` /
  ``permanence`` / ``open_loop_consistent`` {k} (:mod:`worldmodel.metrics`: the cells and fields
  the observations determine; every one in the full view);
- ``reward_f1`` / ``termination_f1`` (teacher-forced, counted only where the training data holds
  at least 5 such events, else null);
- ``imagined_steps_per_second`` at batch 256 and the real env's RGB ``env_steps_per_second``, in
  the same process; ``params``; ``train_seconds``;
- Dynamic-Obstacles: ``obstacle_move_tv`` (:mod:`worldmodel.stochastic`, 200 probe states, 1000
  samples a side) and ``frame_exact_determined_non_obstacle`` (model draws right on every cell
  no env draw changes).

Prints progress and one JSON object last (also ``benchmarks/results/world_models.json``, merged per
env and view so that separate invocations add up): ``{env_id: {view: {...}}, "multi_env": ...,
"machine": {...}}``.

``multi_env`` (:func:`multi_env`): one full-view model trained on the ``--mix`` envs' datasets
(``data.mix``), with the training budget of all their own models together, measured with the same
keys on each env and zero-shot on ``--held-out`` (DoorKey-8x8), each beside the env's own model
(``own_model``). ``--mix ''`` skips it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks._common import RESULTS, ROOT, machine

SEED = 0
MIX = "random:0.5,epsilon_oracle@0.3:0.5"
# Frames per env: the larger the grid, the more frames before the goal and doors are in the data.
DATA = {"doorkey-5x5": 20_000, "doorkey-6x6": 50_000, "doorkey-8x8": 100_000, "doorkey-16x16": 100_000,
        "fourrooms": 100_000, "lavagap-s7": 50_000, "multiroom-n2-s4": 50_000, "keycorridor-s3r1": 100_000,
        "dynamic-obstacles-6x6": 50_000}
KS = (1, 4, 8, 16, 32)


def log(message: str) -> None:
    print(f"[world_models {time.strftime('%H:%M:%S')}] {message}", flush=True)


def build(env: str, view: str, args: argparse.Namespace):
    """The run of one env and view, built through the stage contract (a complete stage is skipped)."""
    from common.config import load_config
    from common.runs import RunDir
    from scripts import collect, train_dynamics, train_tokenizer
    from scripts.config import Config

    cfg = load_config(Config, [
        "--env", env, f"run.root={args.root}", f"run.name={env}_{view}", f"run.seed={SEED}", "run.threads=1",
        "run.progress=false", f"env.obs={view}", f"collect.num_steps={DATA[env]}", f"collect.policy_mix={MIX}",
        f"collect.seed={SEED}", "data.val_fraction=0.1", f"dynamics.time_limit_s={60 * args.minutes}",
        "dynamics.eval_every=0", "dynamics.video_every=0", *args.overrides], use_run_config=False)
    started = time.perf_counter()
    for stage in (collect, train_tokenizer, train_dynamics):
        run = RunDir(cfg, "benchmark", sys.argv).lock()
        try:
            stage.run(cfg, run)
        finally:
            run.unlock()
    return cfg, Path(cfg.run.root) / cfg.run.name, time.perf_counter() - started


def env_steps_per_second(cfg, steps: int = 2000) -> float:
    from envs.make import make_env_from_config

    env = make_env_from_config(cfg.env)
    env.reset(seed=SEED)
    rng = np.random.default_rng(SEED)
    n = int(env.action_space.n)
    started = time.perf_counter()
    for i in range(steps):
        _, _, terminated, truncated, _ = env.step(int(rng.integers(n)))
        if terminated or truncated:
            env.reset(seed=SEED + i)
    return steps / (time.perf_counter() - started)


def imagined_steps_per_second(world_model, starts: np.ndarray, batch: int = 256, steps: int = 40) -> float:
    rng = np.random.default_rng(SEED)
    world_model.reset(torch.as_tensor(starts[rng.integers(len(starts), size=batch)])[:, None])
    actions = torch.as_tensor(rng.integers(world_model.num_actions, size=(steps + 5, batch)))
    for k in range(5):
        world_model.step(actions[k])
    started = time.perf_counter()
    for k in range(5, steps + 5):
        world_model.step(actions[k])
    return batch * steps / (time.perf_counter() - started)


def measure(env: str, view: str, args: argparse.Namespace) -> dict:
    """Build the env's own model and measure it on the env's held-out episodes."""
    from worldmodel.imagine import load_world_model

    cfg, run_path, seconds = build(env, view, args)
    return measure_model(load_world_model(run_path), env, view, cfg, run_path, seconds, args)


def measure_model(world_model, env: str, view: str, cfg, run_path: Path, seconds: float,
                  args: argparse.Namespace) -> dict:
    """The issue's figures of ``world_model`` (trained in ``run_path``) on ``env``'s dataset (``cfg``'s)
    under the same split as the env's own run."""
    from envs.dataset import EpisodeDataset, collect_folder
    from envs.state import StateCodec
    from worldmodel.dynamics import count_parameters
    from worldmodel.metrics import layouts_of, one_step_metrics, open_loop_metrics
    from worldmodel.tokenizer import encode_frames
    from worldmodel.train_dynamics import evaluate_one_step, on_grid_of

    dataset = EpisodeDataset.load(collect_folder(cfg))
    dataset.with_frame_array("tokens", encode_frames(world_model.tokenizer, dataset.arrays["frames"]))
    train_set, val_set = dataset.split(cfg.data.val_fraction, seed=cfg.run.seed)
    codec = StateCodec.for_card(dataset.card)
    layouts = layouts_of(dataset.states[dataset.episode_starts], codec)
    log(f"{env} [{view}]: {dataset.num_steps} steps, measuring on {val_set.num_episodes} held-out episodes")
    dynamics = on_grid_of(world_model.dynamics, dataset.extras["tokens"])  # a full-view model runs on any grid
    one = one_step_metrics(dynamics, val_set, codec, layouts, max_windows=args.windows, seed=SEED)
    loop = open_loop_metrics(world_model, val_set, codec, layouts, context=1 if view == "full" else 8,
                             num_rollouts=args.rollouts, seed=SEED, ks=KS)
    forced = evaluate_one_step(dynamics, val_set, window=32)
    events = {"reward": int((train_set.arrays["rewards"] != 0).sum()), "termination": int(train_set.arrays["terminated"].sum())}
    trained = json.loads((run_path / "metrics.json").read_text()).get("dynamics", {})
    result = {
        "frame_exact_1step": one["frame_exact_1step"],
        "frame_exact_1step_determined": one["frame_exact_1step_determined"],
        "open_loop_consistent": {str(k): v for k, v in loop["open_loop_consistent"].items()},
        "permanence": loop["permanence"] if view == "partial" else None,
        "permanence_cells": loop["permanence_cells"] if view == "partial" else 0,
        "state_head_accuracy_determined": one["state_head_accuracy_determined"],
        "reward_f1": forced["reward_f1"] if events["reward"] >= 5 else None,
        "termination_f1": forced["termination_f1"] if events["termination"] >= 5 else None,
        "training_events": events,
        "imagined_steps_per_second": round(imagined_steps_per_second(world_model, val_set.extras["tokens"][val_set.episode_starts]), 1),
        "env_steps_per_second": round(env_steps_per_second(cfg), 1),
        "train_seconds": trained.get("train_seconds"), "train_steps": trained.get("train_steps"),
        "stages_seconds": round(seconds, 1), "params": count_parameters(dynamics),
        "dataset_frames": int(dataset.num_frames), "policy_mix": MIX, "memory": world_model.config.memory,
    }
    if env.startswith("dynamic-obstacles"):
        from worldmodel.stochastic import obstacle_move_tv, probe_envs

        probes = probe_envs(val_set, str(cfg.env.id), args.probes, seed=SEED, obs=view, tile_size=int(cfg.env.tile_size))
        stochastic = obstacle_move_tv(world_model, probes, args.samples, seed=SEED)
        result["obstacle_move_tv"] = float(stochastic.tv.mean())
        result["obstacle_move_tv_floor"] = float(stochastic.floor.mean()) if len(stochastic.floor) else None
        result["frame_exact_determined_non_obstacle"] = float(stochastic.determined_exact.mean())
    return result


def multi_env(args: argparse.Namespace, fresh: dict) -> dict:
    """One full-view model trained on the ``--mix`` envs' datasets (each env's own, as collected for
    its own model), for as many steps or minutes as all their own models together, then measured on
    each env's held-out episodes and zero-shot on the ``--held-out`` env, beside the env's own model
    (from ``fresh``, the figures measured in this invocation, else measured now)."""
    from common.config import load_config
    from common.runs import RunDir
    from envs.dataset import collect_folder
    from envs.make import normalize_env_id
    from scripts import train_dynamics, train_tokenizer
    from scripts.config import Config
    from worldmodel.imagine import load_world_model

    mix = [e.strip() for e in args.mix.split(",") if e.strip()]
    held_out = args.held_out
    builds = {env: build(env, "full", args) for env in [*mix, held_out]}  # complete runs are skipped
    folders = ",".join(str(collect_folder(builds[env][0])) for env in mix)
    scaled = [o for o in args.overrides if not o.startswith("dynamics.steps=")]
    steps = [int(o.split("=", 1)[1]) * len(mix) for o in args.overrides if o.startswith("dynamics.steps=")]
    cfg = load_config(Config, [
        "--env", mix[0], f"run.root={args.root}", "run.name=multi_env_full", f"run.seed={SEED}", "run.threads=1",
        "run.progress=false", f"data.mix=[{folders}]", "data.val_fraction=0.1",
        # The suite's envs hold up to 60 distinct tiles each (KeyCorridor's colours), 68 together.
        f"tokenizer.codebook_size={args.mix_codebook}",
        f"dynamics.time_limit_s={60 * args.minutes * len(mix)}", "dynamics.eval_every=0", "dynamics.video_every=0",
        *scaled, *[f"dynamics.steps={n}" for n in steps]], use_run_config=False)
    started = time.perf_counter()
    for stage in (train_tokenizer, train_dynamics):
        run = RunDir(cfg, "benchmark", sys.argv).lock()
        try:
            stage.run(cfg, run)
        finally:
            run.unlock()
    seconds = time.perf_counter() - started
    world_model = load_world_model(Path(cfg.run.root) / cfg.run.name)
    result: dict = {"held_out": None, "mix": [], "train_seconds": round(seconds, 1)}
    for env in [*mix, held_out]:
        env_cfg = builds[env][0]
        env_id = normalize_env_id(str(env_cfg.env.id))
        figures = measure_model(world_model, env, "full", env_cfg, Path(cfg.run.root) / cfg.run.name, seconds, args)
        own = fresh.get((env_id, "full")) or measure(env, "full", args)
        fresh[(env_id, "full")] = own
        figures["own_model"] = {k: own.get(k) for k in ("frame_exact_1step", "open_loop_consistent", "reward_f1",
                                                        "termination_f1", "state_head_accuracy_determined", "params")}
        log(f"multi-env model on {env}{' (zero-shot)' if env == held_out else ''}: {json.dumps(figures)}")
        result[env_id] = {"full": figures}
        if env == held_out:
            result["held_out"] = env_id
        else:
            result["mix"].append(env_id)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--envs", default=",".join(DATA), help="env presets, comma-separated")
    parser.add_argument("--views", default="full,partial", help="full, partial or both")
    parser.add_argument("--minutes", type=float, default=10.0, help="dynamics training time box per env and view")
    parser.add_argument("--rollouts", type=int, default=128, help="open-loop rollouts of 32 steps")
    parser.add_argument("--windows", type=int, default=200, help="teacher-forced segments for the 1-step metrics")
    parser.add_argument("--probes", type=int, default=200, help="Dynamic-Obstacles probe states")
    parser.add_argument("--samples", type=int, default=1000, help="samples per probe state and side")
    parser.add_argument("--root", default=str(ROOT / "runs" / "benchmarks" / "world_models"), help="run folders")
    parser.add_argument("--mix", default=",".join(e for e in DATA if e != "doorkey-8x8"),
                        help="envs of the one full-view model for many envs ('' : none)")
    parser.add_argument("--mix-codebook", type=int, default=128, help="tokenizer codes of the multi-env model")
    parser.add_argument("--held-out", default="doorkey-8x8", help="env the multi-env model never sees (measured zero-shot)")
    args, args.overrides = parser.parse_known_args(argv)
    # One thread throughout, measurements included: a stage that is skipped as complete sets none,
    # and two threads beside other work measured imagination 20x slower (1.6k against 31k steps/s).
    torch.set_num_threads(1)
    from common.atomic import atomic_write_json
    from envs.make import normalize_env_id

    path = RESULTS / "world_models.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    fresh: dict = {}  # (env id, view) -> figures measured in this invocation
    for env in (e.strip() for e in args.envs.split(",") if e.strip()):
        if env not in DATA:
            raise SystemExit(f"no dataset size for env preset '{env}': choose from {sorted(DATA)}")
        for view in (v.strip() for v in args.views.split(",") if v.strip()):
            figures = measure(env, view, args)
            log(f"{env} [{view}]: {json.dumps(figures)}")
            from common.config import load_config
            from scripts.config import Config

            env_id = normalize_env_id(str(load_config(Config, ["--env", env], use_run_config=False).env.id))
            out.setdefault(env_id, {})[view] = fresh[(env_id, view)] = figures
            RESULTS.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, out)  # after every env and view: a stopped run keeps what it finished
    if args.mix:
        out["multi_env"] = multi_env(args, fresh)
        for (env_id, view), figures in fresh.items():
            out.setdefault(env_id, {})[view] = figures
    out["machine"] = machine()
    atomic_write_json(path, out)
    print(json.dumps(out, sort_keys=True), flush=True)
    return out


if __name__ == "__main__":
    main()
