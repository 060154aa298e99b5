#!/usr/bin/env python
"""Benchmark of the world model on a stochastic env (issue 19, item 2): Dynamic-Obstacles-6x6.

    python benchmarks/stochastic.py [--threads 1] [--episodes N] [--minutes M] [--probes 200]
                                    [--samples 1000] [--keep] [key=value ...]

Trains from scratch with fixed seeds (collection, tokenizer, dynamics model), then on held-out
episodes measures:

- ``frame_exact_1step_non_obstacle``: the share of sampled next frames (the model's saved
  sampling: objects) right on every determined cell — the cells equal in every env draw from
  the probe state, which leaves out the balls, the cells they may enter and an agent they may block;
- ``obstacle_move_tv``: per ball, the total variation distance between the model's and the env's
  distribution of its next position, averaged over balls and probe states
  (``worldmodel.stochastic.obstacle_move_tv``), with the same measured between two env sample sets
  (the estimate's noise floor), and for comparison under the other sampling orders;
- ``reward_f1`` / ``termination_f1`` (teacher-forced, on the held-out transitions).

Prints progress, then ONE JSON object as the last line; also writes
``benchmarks/results/stochastic.json``. Work files go to ``runs/benchmarks/`` (not tracked).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks._common import finish, machine
from common.config import load_config
from common.runs import RunDir
from envs.collect import collect
from envs.dataset import EpisodeDataset, collect_folder
from scripts.config import Config
from worldmodel.imagine import SamplingConfig, load_world_model
from worldmodel.tokenizer import encode_frames, load_tokenizer
from worldmodel.train_dynamics import evaluate_one_step, train

REPO = Path(__file__).resolve().parent.parent
SEED = 0
ENV_ID = "MiniGrid-Dynamic-Obstacles-6x6-v0"
# Random episodes end at the first wall or ball within a few steps; the epsilon-oracle ones reach
# the goal often enough for the reward head (the re-planning oracle walks around the balls).
POLICY_MIX = "random:0.5,epsilon_oracle@0.2:0.5"
# Sequential sampling needs the decoder's conditionals given part of the next frame: a ball's
# candidate cell must see the whole frame's balls, given and current (conv blocks reach 2 cells:
# measured, their conditionals stayed at the marginals), so attention blocks, trained with most
# transitions partly given; an unweighted loss, whose minimiser is the data's distribution. The
# outcome (a contact with a wall ends the episode while nothing the agent owns changes) is read
# from the whole frame: global decoding.
MODEL_OVERRIDES = ["dynamics.block=attention", "dynamics.decoder_layers=2", "dynamics.decoder_context=global",
                   "dynamics.change_weight=0", "dynamics.refine_fraction=0.8", "dynamics.temperature=1.0",
                   "dynamics.sampling_order=objects"]
# How next frames are drawn: the model's saved default (objects; docs/stochastic.md) and the others, for comparison.
SAMPLING_MODES = {
    "sequential": SamplingConfig(temperature=1.0, order="sequential"),
    "parallel": SamplingConfig(temperature=1.0),
    "maskgit4": SamplingConfig(temperature=1.0, refine_steps=4),
    "objects": SamplingConfig(temperature=1.0, order="objects"),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def make_cfg(args: argparse.Namespace):
    overrides = [f"run.root={REPO / 'runs' / 'benchmarks'}", f"run.name={args.name}", f"run.seed={SEED}",
                 f"run.threads={args.threads}", "run.progress=false", f"env.id={ENV_ID}", "env.obs=full",
                 f"collect.num_episodes={args.episodes}", f"collect.policy_mix={POLICY_MIX}", f"collect.seed={SEED}",
                 "data.val_fraction=0.1", f"dynamics.time_limit_s={60 * args.minutes}", "dynamics.eval_every=0",
                 "dynamics.video_every=0", *MODEL_OVERRIDES, *args.overrides]
    return load_config(Config, overrides, use_run_config=False)


def pipeline(args: argparse.Namespace):
    """Collect, tokenizer, dynamics -> (cfg, dataset with tokens, world model, train seconds)."""
    from omegaconf import OmegaConf

    from worldmodel.train_tokenizer import TokenizerStageConfig
    from worldmodel.train_tokenizer import train as train_tokenizer

    cfg = make_cfg(args)
    run_path = Path(cfg.run.root) / cfg.run.name
    if run_path.exists() and not args.keep:
        shutil.rmtree(run_path)  # from scratch: every figure comes from this run
    run_dir = RunDir(cfg, "benchmark-stochastic", sys.argv)
    started = time.perf_counter()
    log(f"collecting {cfg.collect.num_episodes} episodes of {ENV_ID} ({POLICY_MIX}), load {load_average()}")
    collect(cfg.env, cfg.collect, collect_folder(cfg), progress=False)
    dataset = EpisodeDataset.load(collect_folder(cfg))
    log(f"{dataset.num_episodes} episodes, {dataset.num_steps} steps ({time.perf_counter() - started:.0f} s)")
    if not (run_path / "tokenizer.pt").is_file():
        tok_cfg = OmegaConf.create({"run": cfg.run, "env": cfg.env, "data": cfg.data,
                                    "tokenizer": cfg.tokenizer if "tokenizer" in cfg else
                                    OmegaConf.structured(TokenizerStageConfig)})
        train_set, val_set = dataset.split(cfg.data.val_fraction, seed=cfg.run.seed)
        train_tokenizer(tok_cfg, run_dir, train_set.arrays["frames"], val_set.arrays["frames"] if val_set else None)
    tokenizer = load_tokenizer(run_path / "tokenizer.pt")
    dataset.with_frame_array("tokens", encode_frames(tokenizer, dataset.arrays["frames"]))
    train_seconds = float("nan")
    if args.keep and (run_path / "dynamics.pt").is_file():
        log("reusing the trained dynamics model (--keep)")
        train_seconds = float(torch.load(run_path / "dynamics.pt", weights_only=False).get("metrics", {})
                              .get("train_seconds", float("nan")))
    else:
        log(f"training dynamics: {cfg.dynamics.steps} steps or {args.minutes} min, load {load_average()}")
        train_seconds = float(train(cfg, run_dir, dataset=dataset, tokenizer=tokenizer, log=log)["train_seconds"])
    return cfg, dataset, load_world_model(run_path), train_seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Stochastic-world benchmark (Dynamic-Obstacles-6x6), from scratch.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--episodes", type=int, default=2000, help="episodes collected (about 10 frames each)")
    parser.add_argument("--minutes", type=float, default=8.0, help="dynamics training time limit")
    parser.add_argument("--probes", type=int, default=200, help="held-out probe states for obstacle_move_tv")
    parser.add_argument("--samples", type=int, default=1000, help="next states drawn per probe state, each side")
    parser.add_argument("--modes", default="objects,parallel,sequential", help="sampling modes measured, comma separated")
    parser.add_argument("--floor-probes", type=int, default=50, help="probes whose env-vs-env TV is measured too")
    parser.add_argument("--name", default="bench_stochastic", help="run folder under runs/benchmarks/")
    parser.add_argument("--keep", action="store_true", help="reuse an earlier run folder's models (not from scratch)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        parser.error(f"unrecognised arguments {bad} (config overrides are key=value)")
    args.overrides = overrides
    from worldmodel.stochastic import obstacle_move_tv, probe_envs

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = {"seed": SEED, "policy_mix": POLICY_MIX, "episodes": args.episodes, "threads": args.threads,
            "probes": args.probes, "samples": args.samples, "overrides": [*MODEL_OVERRIDES, *overrides],
            "machine_start": machine()}

    cfg, dataset, world_model, train_seconds = pipeline(args)
    _, val_set = dataset.split(cfg.data.val_fraction, seed=cfg.run.seed)
    assert val_set is not None
    info["dataset_frames"] = int(dataset.num_frames)
    log(f"evaluating on {val_set.num_episodes} held-out episodes, load {load_average()}")
    one_step = evaluate_one_step(world_model.dynamics, val_set, window=32)
    log(f"sampling saved with the model: {world_model.sampling}")
    probes = probe_envs(val_set, ENV_ID, args.probes, seed=SEED)
    by_mode = {}
    for mode in args.modes.split(","):
        sampling = SAMPLING_MODES[mode]
        measure_started = time.perf_counter()
        measured = obstacle_move_tv(world_model, probes, args.samples, sampling=sampling, seed=SEED,
                                    floor_probes=args.floor_probes if not by_mode else 0)  # once: it is the env's
        by_mode[mode] = {**measured.summary(), "seconds": round(time.perf_counter() - measure_started, 1)}
        log(f"sampling '{mode}' ({sampling}): {by_mode[mode]}, load {load_average()}")
    headline = by_mode.get("objects") or next(iter(by_mode.values()))
    info["obstacle_move_tv_env_vs_env"] = next(iter(by_mode.values()))["obstacle_move_tv_env_vs_env"]
    info.update(saved_sampling=str(world_model.sampling), by_sampling=by_mode,
                reward_events=one_step["reward_events"], termination_events=one_step["termination_events"],
                eval_transitions=one_step["transitions"], benchmark_seconds=round(time.perf_counter() - started, 1),
                machine_end=machine())
    result = {ENV_ID: {"full": {
        # determined cells: those equal in every rendered env draw from the probe state (ball cells,
        # their free neighbours and an agent a ball may block are left out)
        "frame_exact_1step_non_obstacle": headline["determined_exact"],
        "obstacle_move_tv": headline["obstacle_move_tv"],
        "reward_f1": one_step["reward_f1"],
        "termination_f1": one_step["termination_f1"],
        "train_seconds": round(train_seconds, 1),
    }}, "details": info}
    # One object, printed last: the figures per env and view, and how they were made ("details").
    finish("stochastic", result)
    return result


if __name__ == "__main__":
    main()
