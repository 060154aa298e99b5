#!/usr/bin/env python
"""Benchmark: inverse dynamics, few action labels, and classifier-free action guidance.

    python benchmarks/inverse.py [--env doorkey-6x6] [--views full,partial] [--frames 20000]
                                 [--fractions 0.01,0.1,1] [--scales 0,0.5,1,1.5,2,3] [--root DIR]

Per view: trains the world model (collect, tokenizer, dynamics: the stages' own ``run(cfg)``,
fixed seeds) and the inverse model (scripts/train_inverse.py) from scratch, and collects held-out
episodes (other env seeds, ``HELD_OUT_MIX``). On the held-out transitions, against their exact
consistent sets (:func:`worldmodel.inverse.consistent_actions`):

- ``accuracy_identifiable``: the action is right where exactly one action fits;
  ``noop_set_exact``: the predicted set is the true one where the frame did not change.
- ``guidance`` {scale: ``frame_exact_1step`` (the next frame under the true action, exactly),
  ``action_following`` (the next frame under a uniformly drawn action equals the frame the real env
  gives for that action)}; ``dynamics.guidance`` = scale, temperature 0, after ``--context`` real frames.
- ``few_labels`` (the full view; ``--few-label-views`` to change): action-free pretraining on every
  training episode (``data.labelled_fraction=0``), then per labelled fraction f a fine-tune from it
  with f of the episodes labelled and the rest action-free (``true``) or labelled by an inverse
  model trained on the f (``inverse``), beside a model trained on the f episodes alone (``alone``):
  held-out ``frame_exact_1step`` (teacher-forced) and ``open_loop_consistent_32`` (32-step
  open-loop rollouts right at every step), and for ``inverse`` the labelling model's own held-out
  ``inverse_accuracy_identifiable`` and ``inverse_set_exact``. Every few-label run trains
  ``--few-steps`` steps.

Prints progress and one JSON object last (also ``benchmarks/results/inverse.json``):
``{env_id: {view: {"accuracy_identifiable", "noop_set_exact", "set_exact", "guidance": {...},
"few_labels": {fraction: {"true": {...}, "inverse": {...}, "alone": {...}}}}}, "machine": {...}}``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from _common import finish, machine

HELD_OUT_MIX = "random:0.5,epsilon_oracle@0.25:0.5"


def log(message: str) -> None:
    print(f"[inverse {time.strftime('%H:%M:%S')}] {message}", flush=True)


def config(argv: list[str]):
    from common.config import cli_config
    from scripts.config import Config, validate

    return cli_config(Config, argv, validate=validate)


def run_stages(argv: list[str], stages) -> Path:
    from common.runs import RunDir

    cfg = config(argv)
    run = RunDir(cfg, "benchmark", argv).lock()
    try:
        for stage in stages:
            stage.run(cfg, run)
    finally:
        run.unlock()
    return run.path


def held_out_metrics(run_path: Path, held) -> dict:
    """Teacher-forced 1-step exactness and 32-step open-loop consistency on the held-out episodes."""
    from worldmodel.imagine import load_world_model
    from worldmodel.metrics import open_loop_metrics
    from worldmodel.train_dynamics import evaluate_one_step, state_codec_for

    world_model = load_world_model(run_dir=run_path)
    one = evaluate_one_step(world_model.dynamics, held)
    loop = open_loop_metrics(world_model, held, state_codec_for(held), context=1, horizon=32, num_rollouts=128)
    return {"frame_exact_1step": one["frame_exact_1step"],
            "open_loop_consistent_32": loop["open_loop_consistent"].get(32)}


def guidance_table(world_model, held, env, scales: list[float], context: int, count: int = 512, seed: int = 0) -> dict:
    import numpy as np
    import torch

    from worldmodel.imagine import SamplingConfig
    from worldmodel.inverse import action_outcomes

    length = context + 1
    eligible = np.flatnonzero(held.episode_lengths + 1 >= length)
    rng = np.random.default_rng(seed)
    episodes = rng.choice(eligible, size=count)
    starts = (rng.random(count) * (held.episode_lengths[episodes] + 1 - length + 1)).astype(np.int64)
    windows = held.windows_at(episodes, starts, length)
    tokens = torch.as_tensor(windows.extras["tokens"]).long()
    actions = torch.as_tensor(windows.actions).long()
    other = torch.as_tensor(rng.integers(0, world_model.num_actions, size=count)).long()
    outcome = np.stack([action_outcomes(env, windows.states[i, context - 1], world_model.num_actions)[int(other[i])]
                        for i in range(count)])
    outcome_tokens = world_model.encode(outcome)
    table = {}
    for scale in scales:
        sampling = SamplingConfig(temperature=0.0, guidance=float(scale))
        world_model.reset(tokens[:, :context], actions[:, :context - 1])
        true_step = world_model.step(actions[:, context - 1], sampling)
        world_model.reset(tokens[:, :context], actions[:, :context - 1])
        other_step = world_model.step(other, sampling)
        table[str(scale)] = {
            "frame_exact_1step": float((true_step.tokens == tokens[:, context]).flatten(1).all(-1).float().mean()),
            "action_following": float((other_step.tokens == outcome_tokens).flatten(1).all(-1).float().mean()),
        }
        log(f"  guidance {scale}: {table[str(scale)]}")
    return table


def few_labels(base: list[str], root: Path, name: str, fractions: list[float], steps: int, held, targets) -> dict:
    """The few-label curve; ``targets`` (held-out transition indices, exact sets) score each inverse model."""
    from scripts import train_dynamics, train_inverse
    from worldmodel.inverse import evaluate, load_inverse

    index, possible = targets
    frames = held.arrays["frames"]

    source = root / name
    short = [*base, f"data.path={source / 'dataset'}", f"dynamics.steps={steps}",
             f"dynamics.checkpoint_every={steps // 2}"]

    def fresh(run_name: str) -> list[str]:
        folder = root / run_name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "tokenizer.pt", folder / "tokenizer.pt")
        return [*short, f"run.name={run_name}"]

    started = time.perf_counter()
    pretrain = run_stages([*fresh(f"{name}-free"), "data.labelled_fraction=0"], [train_dynamics])
    pretrained = root / f"{name}-free.pt"
    shutil.copy(pretrain / "dynamics.pt", pretrained)
    log(f"  action-free pretraining in {time.perf_counter() - started:.0f} s: {held_out_metrics(pretrain, held)}")
    out: dict = {}
    for fraction in fractions:
        row: dict = {}
        label = f"data.labelled_fraction={fraction}"
        tuned = [label, f"dynamics.init={pretrained}"]
        path = run_stages([*fresh(f"{name}-f{fraction}-true"), *tuned, "dynamics.unlabelled=hidden"], [train_dynamics])
        row["true"] = held_out_metrics(path, held)
        if fraction < 1:
            path = run_stages([*fresh(f"{name}-f{fraction}-inverse"), *tuned, "dynamics.unlabelled=inverse"],
                              [train_inverse, train_dynamics])
            row["inverse"] = held_out_metrics(path, held)
            scores = evaluate(load_inverse(path / "inverse.pt")[0], frames[index], frames[index + 1], possible)
            row["inverse"]["inverse_accuracy_identifiable"] = scores["accuracy_identifiable"]
            row["inverse"]["inverse_set_exact"] = scores["set_exact"]
        path = run_stages([*fresh(f"{name}-f{fraction}-alone"), label, "dynamics.unlabelled=drop"], [train_dynamics])
        row["alone"] = held_out_metrics(path, held)
        out[str(fraction)] = row
        log(f"  {fraction:.0%} labelled: {row}")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--env", default="doorkey-6x6", help="env preset")
    parser.add_argument("--views", default="full,partial", help="observation views, comma-separated")
    parser.add_argument("--frames", type=int, default=20_000, help="training frames")
    parser.add_argument("--mix", default="random:0.5,epsilon_oracle@0.3:0.5", help="training behaviour mix")
    parser.add_argument("--dynamics-steps", type=int, default=3000, help="dynamics steps of the main world model")
    parser.add_argument("--fractions", default="0.01,0.1,1", help="labelled fractions of the few-label curve")
    parser.add_argument("--few-steps", type=int, default=1500, help="dynamics steps of every few-label run")
    parser.add_argument("--few-label-views", default="full", help="views that get the few-label curve")
    parser.add_argument("--scales", default="0,0.5,1,1.5,2,3", help="guidance scales")
    parser.add_argument("--context", type=int, default=4, help="real frames before the guided step")
    parser.add_argument("--root", default="/tmp/bench-inverse", help="where the runs go")
    args = parser.parse_args(argv)

    import torch

    from envs.dataset import EpisodeDataset
    from envs.make import make_env
    from scripts import collect, train_dynamics, train_inverse, train_tokenizer
    from worldmodel.imagine import load_world_model
    from worldmodel.inverse import dataset_targets, evaluate, load_inverse
    from worldmodel.tokenizer import encode_frames

    torch.set_num_threads(1)
    root = Path(args.root)
    out: dict = {}
    for view in args.views.split(","):
        name = args.env if view == "full" else f"{args.env}-{view}"
        base = ["--env", args.env, f"env.obs={view}", f"run.root={root}", "run.progress=false", "run.threads=1",
                f"collect.policy_mix={args.mix}", f"collect.num_steps={args.frames}"]
        started = time.perf_counter()
        run_path = run_stages([*base, f"run.name={name}", f"dynamics.steps={args.dynamics_steps}"],
                              [collect, train_tokenizer, train_dynamics, train_inverse])
        held_path = run_stages(["--env", args.env, f"env.obs={view}", f"run.root={root}", f"run.name={name}-held-out",
                                "run.progress=false", "collect.num_steps=4000", f"collect.policy_mix={HELD_OUT_MIX}",
                                "collect.seed=900000"], [collect])
        log(f"{name}: world model and inverse model in {time.perf_counter() - started:.0f} s")
        cfg = config([*base, f"run.name={name}"])
        world_model = load_world_model(run_dir=run_path)
        held = EpisodeDataset.load(held_path / "dataset")
        held.with_frame_array("tokens", encode_frames(world_model.tokenizer, held.arrays["frames"]))
        env = make_env(str(cfg.env.id), obs=view, tile_size=int(cfg.env.tile_size))
        env.reset(seed=0)
        index, possible = dataset_targets(held, env, world_model.num_actions)
        inverse, _ = load_inverse(run_path / "inverse.pt")
        frames = held.arrays["frames"]
        row = evaluate(inverse, frames[index], frames[index + 1], possible)
        log(f"{name}: inverse {row}")
        row["guidance"] = guidance_table(world_model, held, env, [float(s) for s in args.scales.split(",")], args.context)
        if view in args.few_label_views.split(","):
            row["few_labels"] = few_labels([*base], root, name, [float(f) for f in args.fractions.split(",")],
                                           args.few_steps, held, (index, possible))
        row["world_model"] = {"frame_exact_1step_held_out": held_out_metrics(run_path, held)["frame_exact_1step"]}
        out.setdefault(str(cfg.env.id), {})[view] = row
    out["machine"] = machine()
    finish("inverse", out)
    return out


if __name__ == "__main__":
    main()
