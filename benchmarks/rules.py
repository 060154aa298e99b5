#!/usr/bin/env python
"""Rule bench: how often the world model's predictions obey the gridworld's known rules.

    python benchmarks/rules.py [--envs DoorKey-5x5,DoorKey-6x6] [--views full,partial] [--instances 100]
                               [--run RUN] [--minutes 6] [key=value ...]

For every env and view: build a world model from scratch in ``runs/benchmarks/rules_<env>_<view>``
(collect a fixed-seed dataset, train the tokenizer and the dynamics model through the stage
contract), or reuse the run folder given by ``--run``; then build the probes of
:mod:`worldmodel.probes` on seeds the dataset did not use (after the last seed its card records),
let the model predict each probe's next step from the probe's real history and judge it.

Prints progress, then ONE JSON object as the last line,
``{env_id: {view: {rule: {"rate", "instances", ...}}}, "setup": {env_id: {view: {...}}}, "machine": {...}}``
(setup: the dataset, training time and seeds), merged into ``benchmarks/results/rules.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks._common import RESULTS, ROOT, machine
from common.atomic import atomic_write_json
from common.config import load_config
from common.runs import RunDir
from envs.dataset import collect_folder, read_card
from envs.make import normalize_env_id
from worldmodel import probes

SEED = 0
POLICY_MIX = "random:0.5,epsilon_oracle@0.3:0.5"
COLLECT_STEPS = 20000
# The egocentric view needs a model that remembers: what the dynamics benchmark trains it with.
PARTIAL_OVERRIDES: list[str] = []  # the egocentric defaults (memory=map, 3 conv decoder blocks)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def short_name(env_id: str) -> str:
    return normalize_env_id(env_id).removeprefix("MiniGrid-").removesuffix("-v0").lower()


def make_cfg(env_id: str, view: str, args: argparse.Namespace, run: str | None = None):
    """The config of one env and view: a fixed-seed dataset and time-boxed training (or ``run``'s folder)."""
    from scripts.config import Config

    if run is not None:
        path = Path(run).resolve()
        return load_config(Config, [f"run.root={path.parent}", f"run.name={path.name}"])
    overrides = [f"run.root={ROOT / 'runs' / 'benchmarks'}", f"run.name=rules_{short_name(env_id)}_{view}",
                 f"run.seed={SEED}", f"run.threads={args.threads}", "run.progress=false",
                 f"env.id={normalize_env_id(env_id)}", f"env.obs={view}", f"collect.num_steps={args.collect_steps}",
                 f"collect.policy_mix={POLICY_MIX}", f"collect.seed={SEED}", "data.val_fraction=0.1",
                 f"dynamics.time_limit_s={60 * args.minutes}", "dynamics.eval_every=0", "dynamics.video_every=0"]
    if view == "partial":
        overrides += PARTIAL_OVERRIDES
    return load_config(Config, [*overrides, *args.overrides], use_run_config=False)


def build_run(cfg) -> dict:
    """Collect, tokenizer, dynamics through the stage contract (a complete stage is skipped)."""
    from scripts import collect, train_dynamics, train_tokenizer

    timing = {}
    for name, stage in (("collect", collect), ("tokenizer", train_tokenizer), ("dynamics", train_dynamics)):
        started = time.perf_counter()
        run_dir = RunDir(cfg, name, sys.argv).lock()
        try:
            stage.run(cfg, run_dir)
        finally:
            run_dir.unlock()
        timing[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
        log(f"  {name} ready ({timing[f'{name}_seconds']:.0f} s), load {load_average()}")
    return timing


def bench_one(env_id: str, view: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """One env and view: (per-rule figures, how the model and the probes were made)."""
    from worldmodel.imagine import SamplingConfig, load_world_model

    cfg = make_cfg(env_id, view, args, args.run)
    run_path = Path(cfg.run.root) / cfg.run.name
    log(f"{env_id} [{view}]: run folder {run_path}, load {load_average()}")
    timing = {} if args.run else build_run(cfg)
    card = read_card(collect_folder(cfg))
    if card["env_id"] != normalize_env_id(env_id) or card["obs"] != view:
        raise SystemExit(f"{run_path} holds a model of {card['env_id']} ({card['obs']} view), not {env_id} ({view})")
    world_model = load_world_model(run_path)
    world_model.sampling = SamplingConfig()  # the most likely next frame: the rules are deterministic
    seeds = probes.held_out_seeds(card, args.seeds)
    result: dict = {}
    started = time.perf_counter()
    for rule in probes.rules_for(card["env_id"], view):
        built = probes.build_probes(card["env_id"], view, rule, seeds, instances=args.instances,
                                    tile_size=card["tile_size"])
        result[rule] = probes.evaluate(world_model, built)
        log(f"  {rule}: {result[rule]['rate']} of {result[rule]['instances']} "
            f"(frame {result[rule].get('frame')}, outcome {result[rule].get('outcome')}, "
            f"carrying {result[rule].get('carrying')}), load {load_average()}")
    trained = json.loads((run_path / "metrics.json").read_text())
    setup = {
        "run": str(run_path), "reused": bool(args.run), "dataset_steps": card["steps"],
        "dataset_episodes": card["episodes"], "dataset_seeds": card["seeds"],
        "policy_mix": [spec["label"] + f":{spec['weight']:g}" for spec in card["policy_mix"]],
        "tokenizer_train_seconds": trained.get("tokenizer", {}).get("train_seconds"),
        "dynamics_train_seconds": trained.get("dynamics", {}).get("train_seconds"),
        "dynamics_train_steps": trained.get("dynamics", {}).get("train_steps"),
        "dynamics_frame_exact_1step": trained.get("dynamics", {}).get("frame_exact_1step"),
        "probe_seeds": [seeds.start, seeds.stop - 1], "probe_seconds": round(time.perf_counter() - started, 1),
        "load_average": load_average(), "this_run_stage_seconds": timing,
    }
    return result, setup


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="DoorKey-5x5,DoorKey-6x6", help="comma-separated env ids")
    parser.add_argument("--views", default="full", help="comma-separated views: full, partial")
    parser.add_argument("--instances", type=int, default=100, help="probe instances per rule")
    parser.add_argument("--seeds", type=int, default=400, help="held-out env seeds the probes are drawn from")
    parser.add_argument("--run", default=None, help="reuse this run folder's model (one env and view) instead of training")
    parser.add_argument("--minutes", type=float, default=6.0, help="dynamics training time limit per env and view")
    parser.add_argument("--collect-steps", type=int, default=COLLECT_STEPS, help="dataset size in env steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", default=str(RESULTS / "rules.json"), help="where the JSON object is written")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        parser.error(f"unrecognised arguments {bad} (config overrides are key=value)")
    args.overrides = overrides
    torch.set_num_threads(args.threads)
    envs = [normalize_env_id(e.strip()) for e in args.envs.split(",") if e.strip()]
    views = [v.strip() for v in args.views.split(",") if v.strip()]
    if args.run and len(envs) * len(views) != 1:
        parser.error("--run reuses one model: give one env and one view")
    output = Path(args.output)
    results: dict = json.loads(output.read_text()) if output.is_file() else {}
    for env_id in envs:
        for view in views:
            figures, setup = bench_one(env_id, view, args)
            results.setdefault(env_id, {})[view] = figures
            results.setdefault("setup", {}).setdefault(env_id, {})[view] = setup
            results["machine"] = machine()
            atomic_write_json(output, results)  # kept if a later env is stopped
    print(json.dumps(results, sort_keys=True), flush=True)
    return results


if __name__ == "__main__":
    main()
