#!/usr/bin/env python
"""Benchmark: does the world model know where it is wrong? Which signal predicts a real error.

    python benchmarks/uncertainty.py [--env doorkey-5x5] [--frames 10000] [--steps 1500,150] [--root DIR]

For each dynamics budget in ``--steps`` (the quickstart's 1500, and an under-trained 150), trains
the world model from scratch on ``--frames`` uniform-random frames (fixed seeds), then scores
held-out real transitions (other env seeds; random, epsilon-oracle and oracle episodes: states the
random data rarely reaches) one step each from the real frame. A transition is *wrong* when the
model's most likely next frame, reward or termination differs from the real one. Per signal
(:mod:`worldmodel.uncertainty`: ``confidence``, the decoder's own doubt; ``novelty``, the share of
positions whose 3x3 context with the action never occurs in the training data) the AUROC of
ranking wrong transitions above right ones. Then evaluates a family of scripted policies
(random, sticky random, epsilon-oracle at several epsilon, oracle) in the real env and in the
model, and reports ``trust_gap_spearman``: the rank correlation over policies of the model's mean
doubt along a policy's imagined episodes with its |imagined - real| return gap.

Prints progress and one JSON object last (also ``benchmarks/results/uncertainty.json``):
``{env_id: {"steps=<n>": {"transitions", "error_rate", "auroc_confidence", "auroc_novelty",
"doubt_right", "doubt_wrong", "novelty_right", "novelty_wrong", "trust_gap_spearman",
"num_policies", "mae", "spearman"}}, "machine": {...}}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import finish, machine

HELD_OUT_MIX = "random:0.34,epsilon_oracle@0.25:0.33,oracle:0.33"
POLICIES = ("random,sticky_random@0.75,sticky_random@0.5,epsilon_oracle@0.9,epsilon_oracle@0.75,epsilon_oracle@0.5,"
            "epsilon_oracle@0.35,epsilon_oracle@0.25,epsilon_oracle@0.1,epsilon_oracle@0.05,oracle")


def log(message: str) -> None:
    print(f"[uncertainty {time.strftime('%H:%M:%S')}] {message}", flush=True)


def transition_scores(world_model, held_out, novelty_index, batch: int = 512) -> dict:
    """Score every held-out transition from its real frame: (wrong, doubt, novelty) arrays."""
    import numpy as np
    import torch

    from worldmodel.tokenizer import encode_frames

    tokens = encode_frames(world_model.tokenizer, held_out.frames)
    actions = held_out.arrays["actions"]
    rewards, terminated = held_out.arrays["rewards"], held_out.arrays["terminated"]
    rows = np.flatnonzero(actions >= 0)
    wrong, doubt, novelty = [], [], []
    for i in range(0, len(rows), batch):
        pick = rows[i : i + batch]
        act = torch.as_tensor(actions[pick]).long()
        world_model.reset(torch.as_tensor(tokens[pick])[:, None])
        doubt.append(world_model.uncertainty(act).cpu().numpy())
        step = world_model.step(act)
        frame_wrong = (step.tokens.cpu().numpy() != tokens[pick + 1]).reshape(len(pick), -1).any(-1)
        reward_wrong = (step.reward.cpu().numpy() > 0) != (rewards[pick] > 0)
        term_wrong = step.terminated.cpu().numpy() != terminated[pick]
        wrong.append(frame_wrong | reward_wrong | term_wrong)
        novelty.append(novelty_index.novelty(tokens[pick], actions[pick]))
    return {"wrong": np.concatenate(wrong), "doubt": np.concatenate(doubt), "novelty": np.concatenate(novelty)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--env", default="doorkey-5x5", help="env preset")
    parser.add_argument("--frames", type=int, default=10_000, help="uniform-random training frames")
    parser.add_argument("--steps", default="1500,150", help="dynamics training steps, comma-separated")
    parser.add_argument("--held-out", type=int, default=3000, help="held-out transitions to score")
    parser.add_argument("--episodes", type=int, default=50, help="evaluation episodes per policy")
    parser.add_argument("--root", default="/tmp/bench-uncertainty", help="where the runs go")
    args = parser.parse_args(argv)

    from agents.evaluate import evaluate
    from common.config import cli_config
    from common.runs import RunDir
    from envs.dataset import EpisodeDataset
    from scripts import collect, train_dynamics, train_tokenizer
    from scripts.config import Config, validate
    from worldmodel.imagine import load_world_model
    from worldmodel.tokenizer import encode_frames
    from worldmodel.uncertainty import NoveltyIndex, auroc

    root = Path(args.root)
    out: dict = {}
    env_id = None
    for steps in (int(s) for s in args.steps.split(",")):
        name = f"{args.env}-steps{steps}"
        base = ["--env", args.env, f"run.root={root}", "run.progress=false", "run.threads=1"]
        argv_run = [*base, f"run.name={name}", f"collect.num_steps={args.frames}", "collect.policy_mix=random:1",
                    f"dynamics.steps={steps}", f"dynamics.checkpoint_every={max(steps // 2, 1)}",
                    f"evaluate.policies={POLICIES}", f"evaluate.episodes={args.episodes}", "evaluate.gif_policies=oracle"]
        cfg = cli_config(Config, argv_run, validate=validate)
        env_id = str(cfg.env.id)
        started = time.perf_counter()
        run = RunDir(cfg, "benchmark", argv_run).lock()
        try:
            for stage in (collect, train_tokenizer, train_dynamics):
                stage.run(cfg, run)
        finally:
            run.unlock()
        train_seconds = time.perf_counter() - started
        log(f"{name}: world model trained in {train_seconds:.0f} s")

        held_cfg = cli_config(Config, [*base, f"run.name={name}-held-out", f"collect.num_steps={args.held_out}",
                                       f"collect.policy_mix={HELD_OUT_MIX}", "collect.seed=700000"], validate=validate)
        held_run = RunDir(held_cfg, "benchmark", []).lock()
        try:
            collect.run(held_cfg, held_run)
        finally:
            held_run.unlock()
        world_model = load_world_model(run_dir=run.path)
        training = EpisodeDataset.load(run.path / "dataset")
        index = NoveltyIndex.from_dataset(training, encode_frames(world_model.tokenizer, training.frames),
                                          world_model.config.vocab_size, world_model.num_actions)
        scores = transition_scores(world_model, EpisodeDataset.load(held_run.path / "dataset"), index)
        wrong = scores["wrong"]
        result = {
            "transitions": int(len(wrong)), "error_rate": float(wrong.mean()),
            "auroc_confidence": auroc(scores["doubt"], wrong), "auroc_novelty": auroc(scores["novelty"], wrong),
            "doubt_right": float(scores["doubt"][~wrong].mean()) if (~wrong).any() else None,
            "doubt_wrong": float(scores["doubt"][wrong].mean()) if wrong.any() else None,
            "novelty_right": float(scores["novelty"][~wrong].mean()) if (~wrong).any() else None,
            "novelty_wrong": float(scores["novelty"][wrong].mean()) if wrong.any() else None,
            "train_seconds": round(train_seconds, 1),
        }
        log(f"{name}: {result}")
        evaluated = evaluate(cfg, run.lock(), world_model=world_model)
        run.unlock()
        result.update({k: evaluated.get(k) for k in ("trust_gap_spearman", "num_policies", "mae", "spearman")})
        result["policy_doubt_and_gap"] = [[r["policy"], r["uncertainty"], abs(r["return_gap"])]
                                          for r in evaluated["policies"]]
        log(f"{name}: trust_gap_spearman {result['trust_gap_spearman']}")
        out.setdefault(env_id, {})[f"steps={steps}"] = result
    out["machine"] = machine()
    finish("uncertainty", out)
    return out


if __name__ == "__main__":
    main()
