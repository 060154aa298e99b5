#!/usr/bin/env python
"""Benchmark of the dynamics model (issue 4): trains everything it measures from scratch, fixed seed.

    python benchmarks/dynamics.py [--threads 2] [--skip-partial] [--steps N] [--episodes N] [key=value ...]

1. Full view, DoorKey-6x6: collect a random + epsilon-oracle mix with the project's collection
   code, train the tokenizer, train the dynamics model (``DynamicsConfig`` defaults), then
   on held-out episodes measure next-frame exactness (1 step, and open loop k = 1..32 with the
   true actions), reward / termination F1, state-head accuracy, imagined steps per second at
   batch 256 and the real env's RGB stepping rate, both in this run.
2. Partial (egocentric) view, same env: the same pipeline, then 1-step exactness where the next
   frame is determined by what the context has seen, and sample diversity where it is not.

Prints progress, then ONE flat JSON object as the last line; also writes
``benchmarks/results/dynamics.json``. Work files go to ``runs/benchmarks/`` (not tracked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from common.atomic import atomic_write_json
from common.config import load_config
from common.runs import RunDir
from envs.collect import collect
from envs.dataset import EpisodeDataset, collect_folder
from envs.make import make_env
from scripts.config import Config
from worldmodel.imagine import SamplingConfig, WorldModel, load_world_model
from worldmodel.tokenizer import encode_frames
from worldmodel.train_dynamics import evaluate_one_step, open_loop, train

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
SEED = 0
ENV_ID = "MiniGrid-DoorKey-6x6-v0"
POLICY_MIX = "random:0.5,epsilon_oracle@0.3:0.5"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def make_cfg(name: str, obs: str, args: argparse.Namespace, extra: list[str] = ()):
    overrides = [f"run.root={REPO / 'runs' / 'benchmarks'}", f"run.name={name}", f"run.seed={SEED}", f"run.threads={args.threads}",
                 "run.progress=false", f"env.id={ENV_ID}", f"env.obs={obs}", f"collect.num_episodes={args.episodes}",
                 f"collect.policy_mix={POLICY_MIX}", f"collect.seed={SEED}", "data.val_fraction=0.1"]
    if args.steps:
        overrides.append(f"dynamics.steps={args.steps}")
    minutes = args.partial_minutes if obs == "partial" else args.minutes
    overrides += [f"dynamics.time_limit_s={60 * minutes}", "dynamics.eval_every=0", "dynamics.video_every=0"]
    if obs == "partial":
        overrides.append(f"collect.num_episodes={args.partial_episodes}")
    return load_config(Config, [*overrides, *extra], use_run_config=False)


def train_tokenizer_stage(cfg, run_dir: RunDir, dataset: EpisodeDataset) -> None:
    """The tokenizer engineer's training loop with its own defaults (TokenizerStageConfig)."""
    from omegaconf import OmegaConf

    from worldmodel.train_tokenizer import TokenizerStageConfig
    from worldmodel.train_tokenizer import train as train_tokenizer

    if "tokenizer" not in cfg:  # the root config may not register the section yet
        section = OmegaConf.structured(TokenizerStageConfig)
        cfg = OmegaConf.create({"run": cfg.run, "env": cfg.env, "data": cfg.data, "tokenizer": section})
    train_set, val_set = dataset.split(cfg.data.val_fraction, seed=cfg.run.seed)
    train_tokenizer(cfg, run_dir, train_set.arrays["frames"], val_set.arrays["frames"] if val_set else None)


def pipeline(name: str, obs: str, args: argparse.Namespace, extra: list[str] = ()):
    """Collect, tokenizer, dynamics for one observation mode -> (cfg, dataset, world model, metrics)."""
    cfg = make_cfg(name, obs, args, [*extra, *getattr(args, "overrides", [])])
    run_path = Path(cfg.run.root) / cfg.run.name
    if run_path.exists() and not args.keep:
        shutil.rmtree(run_path)  # from scratch: every figure comes from this run
    run_dir = RunDir(cfg, "benchmark-dynamics", sys.argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    log(f"[{obs}] collecting {cfg.collect.num_episodes} episodes of {ENV_ID} ({POLICY_MIX}), load {load_average()}")
    collect(cfg.env, cfg.collect, collect_folder(cfg), progress=False)
    dataset = EpisodeDataset.load(collect_folder(cfg))
    log(f"[{obs}] {dataset.num_episodes} episodes, {dataset.num_steps} steps ({time.perf_counter() - started:.0f} s)")
    tokenizer_started = time.perf_counter()
    if not (run_path / "tokenizer.pt").is_file():
        train_tokenizer_stage(cfg, run_dir, dataset)
    tokenizer_seconds = time.perf_counter() - tokenizer_started
    log(f"[{obs}] tokenizer ready ({tokenizer_seconds:.0f} s), load {load_average()}")
    from worldmodel.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(run_path / "tokenizer.pt")
    dataset.with_frame_array("tokens", encode_frames(tokenizer, dataset.arrays["frames"]))
    log(f"[{obs}] training dynamics: {cfg.dynamics.steps} steps, load {load_average()}")
    metrics = train(cfg, run_dir, dataset=dataset, tokenizer=tokenizer, log=log)
    world_model = load_world_model(run_path)
    return cfg, dataset, world_model, {"train_seconds": metrics["train_seconds"],
                                       "tokenizer_seconds": round(tokenizer_seconds, 1)}


# ---------------------------------------------------------------------------------------------
# Measures
# ---------------------------------------------------------------------------------------------


def env_steps_per_second(obs: str, steps: int = 3000) -> float:
    """Random-action stepping of one real env with RGB frames (resets included)."""
    env = make_env(ENV_ID, obs=obs, seed=SEED)
    rng = np.random.default_rng(SEED)
    started = time.perf_counter()
    for i in range(steps):
        _, _, terminated, truncated, _ = env.step(int(rng.integers(7)))
        if terminated or truncated:
            env.reset(seed=SEED + i)
    return steps / (time.perf_counter() - started)


def imagined_steps_per_second(world_model: WorldModel, dataset: EpisodeDataset, batch: int = 256,
                              steps: int = 40, with_state: bool = False) -> float:
    """Imagined transitions per second at ``batch`` parallel rollouts: tokens, reward and termination
    every step (what an agent reading tokens pays; no frame decoding), and with ``with_state`` the
    state head's estimate too (what a policy reading states pays)."""
    starts = dataset.extras["tokens"][dataset.episode_starts]
    rng = np.random.default_rng(SEED)
    context = torch.as_tensor(starts[rng.integers(len(starts), size=batch)])
    actions = torch.as_tensor(rng.integers(7, size=(steps + 5, batch)))
    world_model.reset(context)

    def step(k: int) -> None:
        result = world_model.step(actions[k])
        if with_state:
            _ = result.state  # the state head runs on access

    for k in range(5):  # warm-up
        step(k)
    started = time.perf_counter()
    for k in range(5, steps + 5):
        step(k)
    return batch * steps / (time.perf_counter() - started)


def full_view_measures(world_model: WorldModel, val_set: EpisodeDataset, rollouts: int) -> dict:
    one_step = evaluate_one_step(world_model.dynamics, val_set, window=32)
    result = open_loop(world_model, val_set, horizon=32, num_rollouts=rollouts, seed=SEED)
    exact = result["exact"]  # (R, 32)
    state_ok = (result["states_real"] == result["states_imagined"]).all(-1)
    return {
        "frame_exact_1step": one_step["frame_exact_1step"],
        "token_accuracy_1step": one_step["token_accuracy"],
        "reward_f1": one_step["reward_f1"],
        "termination_f1": one_step["termination_f1"],
        "state_head_accuracy": one_step["state_head_accuracy"],
        "frame_exact_open_loop": {str(k + 1): round(float(exact[:, k].mean()), 4) for k in range(exact.shape[1])},
        "state_head_accuracy_open_loop_32": round(float(state_ok[:, -1].mean()), 4),
        "eval_transitions": one_step["transitions"],
        "open_loop_rollouts": int(exact.shape[0]),
    }


def visible_cells(state: np.ndarray, codec, base_env) -> set[tuple[int, int]]:
    """World cells (x, y) the agent sees in this state (MiniGrid's own visibility computation)."""
    from minigrid.core.grid import Grid

    decoded = codec.decode(state)
    base = base_env.unwrapped
    base.grid, _ = Grid.decode(decoded.grid)
    base.agent_pos = tuple(decoded.agent_pos)
    base.agent_dir = int(decoded.agent_dir)
    base.carrying = None
    _, vis_mask = base.gen_obs_grid()
    seen = set()
    for x in range(codec.width):
        for y in range(codec.height):
            view = base.relative_coords(x, y)
            if view is not None and vis_mask[view[0], view[1]]:
                seen.add((x, y))
    return seen


@torch.no_grad()
def partial_view_measures(world_model: WorldModel, val_set: EpisodeDataset, samples: int = 8,
                          window: int = 16, max_windows: int = 120) -> dict:
    """1-step exactness where the next view shows only cells the context has seen (the next frame is
    determined), and, where it shows unseen cells, how many of ``samples`` sampled next frames differ."""
    from envs.state import StateCodec

    codec = StateCodec.for_array_size(val_set.arrays["states"].shape[1])
    probe = make_env(ENV_ID, obs="partial", seed=SEED)
    rng = np.random.default_rng(SEED)
    eligible = np.nonzero(val_set.episode_lengths + 1 >= window)[0]
    episodes = rng.choice(eligible, size=min(max_windows, len(eligible)), replace=False)
    starts = (rng.random(len(episodes)) * (val_set.episode_lengths[episodes] + 2 - window)).astype(np.int64)
    batch = val_set.windows_at(episodes, starts, window)
    tokens = torch.as_tensor(batch.extras["tokens"], device=world_model.device)
    actions = torch.as_tensor(batch.actions, device=world_model.device)
    out = world_model.dynamics(tokens, actions)
    greedy = world_model.dynamics.tokens_from_logits(out.token_logits)  # (B, T, N)
    determined_exact, undetermined_exact, distinct_fraction, any_different = [], [], [], []
    model = world_model.dynamics
    for b in range(len(episodes)):
        seen: set[tuple[int, int]] = set()
        for t in range(window - 1):
            seen |= visible_cells(batch.states[b, t], codec, probe)
            if actions[b, t] < 0:
                break
            nxt = visible_cells(batch.states[b, t + 1], codec, probe)
            exact = bool(torch.equal(greedy[b, t], tokens[b, t + 1].flatten()))
            if nxt <= seen:
                determined_exact.append(exact)
                continue
            undetermined_exact.append(exact)
            # Sample the uncertain next frame a few times from the same context.
            cache, _ = model.start(tokens[b : b + 1, : t + 1].repeat(samples, 1, 1, 1), actions[b : b + 1, :t].repeat(samples, 1))
            drawn = model.predict(cache, actions[b, t].repeat(samples), temperature=1.0, refine_steps=4,
                                  generator=world_model.generator).tokens.flatten(1)
            distinct = len({tuple(row.tolist()) for row in drawn})
            distinct_fraction.append(distinct / samples)
            any_different.append(distinct > 1)
    return {
        "partial_frame_exact_1step_determined": round(float(np.mean(determined_exact)), 4) if determined_exact else None,
        "partial_determined_transitions": len(determined_exact),
        "partial_frame_exact_1step_undetermined": round(float(np.mean(undetermined_exact)), 4) if undetermined_exact else None,
        "partial_undetermined_transitions": len(undetermined_exact),
        "partial_sample_distinct_fraction": round(float(np.mean(distinct_fraction)), 4) if distinct_fraction else None,
        "partial_sample_any_different": round(float(np.mean(any_different)), 4) if any_different else None,
    }


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the target machine has 2 cores)")
    parser.add_argument("--episodes", type=int, default=400, help="episodes collected per observation mode")
    parser.add_argument("--steps", type=int, default=0, help="dynamics steps (0: the DynamicsConfig default)")
    parser.add_argument("--rollouts", type=int, default=256, help="open-loop rollouts of 32 steps")
    parser.add_argument("--minutes", type=float, default=10.0, help="dynamics training time limit, full view (the target)")
    parser.add_argument("--partial-minutes", type=float, default=5.0, help="dynamics training time limit, partial view")
    parser.add_argument("--partial-episodes", type=int, default=200, help="episodes collected for the partial view")
    parser.add_argument("--skip-partial", action="store_true", help="measure the full view only")
    parser.add_argument("--keep", action="store_true", help="reuse an earlier benchmark run folder (not from scratch)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        parser.error(f"unrecognised arguments {bad} (config overrides are key=value)")
    args.overrides = overrides
    torch.set_num_threads(args.threads)
    results: dict = {"env_id": ENV_ID, "policy_mix": POLICY_MIX, "seed": SEED, "threads": args.threads,
                     "load_average_start": load_average()}
    benchmark_started = time.perf_counter()

    # ---- full view ----------------------------------------------------------------------------
    cfg, dataset, world_model, timing = pipeline("bench_dynamics_full", "full", args)
    _, val_set = dataset.split(cfg.data.val_fraction, seed=cfg.run.seed)
    assert val_set is not None
    world_model.sampling = SamplingConfig()  # greedy: the full view is deterministic
    log(f"[full] evaluating on {val_set.num_episodes} held-out episodes, load {load_average()}")
    results.update(full_view_measures(world_model, val_set, args.rollouts))
    results["train_seconds"] = timing["train_seconds"]
    results["tokenizer_train_seconds"] = timing["tokenizer_seconds"]
    results["load_average_after_training"] = load_average()
    results["env_steps_per_second"] = round(env_steps_per_second("full"), 1)
    # Batch-256 steps are small ops: on a busy machine a second thread can cost more than it gives
    # (measured: 2 threads 10x slower than 1 beside another 2-thread job). Both are measured, each
    # the median of 3 runs, and the faster setting is the figure.
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        results[f"imagined_steps_per_second_{threads}_threads"] = round(float(np.median(
            [imagined_steps_per_second(world_model, dataset) for _ in range(3)])), 1)
        results[f"imagined_steps_per_second_with_state_{threads}_threads"] = round(float(np.median(
            [imagined_steps_per_second(world_model, dataset, with_state=True) for _ in range(3)])), 1)
    torch.set_num_threads(args.threads)
    best = max(sorted({1, args.threads}), key=lambda t: results[f"imagined_steps_per_second_{t}_threads"])
    results["imagined_threads"] = best
    results["imagined_steps_per_second"] = results[f"imagined_steps_per_second_{best}_threads"]
    results["imagined_steps_per_second_with_state"] = results[f"imagined_steps_per_second_with_state_{best}_threads"]
    results["env_steps_per_second_after"] = round(env_steps_per_second("full"), 1)  # load drifts: measure around
    results["imagined_speedup"] = round(results["imagined_steps_per_second"] / np.mean(
        [results["env_steps_per_second"], results["env_steps_per_second_after"]]), 2)
    results["load_average_speed"] = load_average()
    log(f"[full] {json.dumps({k: v for k, v in results.items() if k != 'frame_exact_open_loop'})}")
    atomic_write_json(ROOT / "results" / "dynamics.json", results)  # the full view's figures, kept if stopped later

    # ---- partial view -------------------------------------------------------------------------
    if not args.skip_partial:
        cfg_p, dataset_p, world_model_p, timing_p = pipeline("bench_dynamics_partial", "partial", args)
        _, val_p = dataset_p.split(cfg_p.data.val_fraction, seed=cfg_p.run.seed)
        assert val_p is not None
        log(f"[partial] evaluating, load {load_average()}")
        results.update(partial_view_measures(world_model_p, val_p))
        results["partial_frame_exact_1step_all"] = round(evaluate_one_step(world_model_p.dynamics, val_p, window=16)["frame_exact_1step"], 4)
        results["partial_train_seconds"] = timing_p["train_seconds"]
    results["benchmark_seconds"] = round(time.perf_counter() - benchmark_started, 1)
    results["load_average_end"] = load_average()
    atomic_write_json(ROOT / "results" / "dynamics.json", results)
    print(json.dumps(results, sort_keys=True))
    return results


if __name__ == "__main__":
    main()
