#!/usr/bin/env python
"""Benchmark: does the world model rank a zoo of policies as the real env does, and how far are its
imagined returns from the real ones? The field's metrics with 95% bootstrap intervals.

    python benchmarks/ranking.py [--envs doorkey-5x5,doorkey-6x6,...] [--episodes 100] [--root DIR]

Per env (full view): one run from scratch with fixed seeds — data (``FRAMES`` frames, a random +
epsilon-oracle mix so the model sees the places good policies go), tokenizer, dynamics, the
Dreamer agent with a checkpoint every ``--every`` updates — then one evaluation of the zoo, each
policy ``--episodes`` episodes in the real env and in the model from the same first frames:

- the scripted family: random, sticky random at 4 repeat rates, epsilon-oracle at 15 epsilons,
  the oracle (21 policies);
- the Dreamer agent and up to ``--checkpoints`` of its checkpoints along training;
- every ``.pt`` given with ``--extra`` (e.g. PPO checkpoints, ``python scripts/train_ppo.py``).

Prints progress and one JSON object last (also ``benchmarks/results/ranking.json``):
``{env_id: {"full": {"num_policies", "episodes", "mae", "mae_normalized", "spearman", "kendall",
"pearson", "regret_at_1", "regret_at_3", "mmrv", "trust_gap_spearman", "<metric>_ci", ...,
"eval_seconds", "train_seconds"}}, "machine": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import finish, machine

FRAMES = {"doorkey-5x5": 10_000, "doorkey-6x6": 50_000, "doorkey-8x8": 100_000, "fourrooms": 100_000,
          "lavagap-s7": 50_000, "multiroom-n2-s4": 50_000, "keycorridor-s3r1": 100_000}
MIX = "random:0.6,epsilon_oracle@0.5:0.2,epsilon_oracle@0.2:0.2"
SCRIPTED = ["random", *(f"sticky_random@{p}" for p in (0.25, 0.5, 0.75, 0.9)),
            *(f"epsilon_oracle@{e}" for e in (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85,
                                               0.9, 0.95)),
            "oracle"]
KEYS = ("num_policies", "episodes", "mae", "mae_normalized", "spearman", "kendall", "pearson", "regret_at_1",
        "regret_at_3", "mmrv", "success_calibration_error", "trust_gap_spearman", "eval_seconds")


def log(message: str) -> None:
    print(f"[ranking {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--envs", default="doorkey-5x5,doorkey-6x6,lavagap-s7,multiroom-n2-s4,keycorridor-s3r1",
                        help="env presets, comma-separated")
    parser.add_argument("--episodes", type=int, default=100, help="episodes per policy in each world")
    parser.add_argument("--every", type=int, default=50, help="Dreamer checkpoint interval (updates)")
    parser.add_argument("--checkpoints", type=int, default=14, help="Dreamer checkpoints along training in the zoo")
    parser.add_argument("--extra", default="", help="more policies for the zoo (comma-separated specs or .pt paths)")
    parser.add_argument("--root", default="/tmp/bench-ranking", help="where the runs go")
    args, overrides = parser.parse_known_args(argv)

    from scripts import quickstart

    out: dict = {}
    for env in (e.strip() for e in args.envs.split(",") if e.strip()):
        if env not in FRAMES:
            raise SystemExit(f"no frame budget for env preset '{env}': choose from {sorted(FRAMES)}")
        zoo = ",".join(["dreamer", "checkpoints", *SCRIPTED, *[p for p in args.extra.split(",") if p]])
        argv_run = ["--env", env, f"run.root={args.root}", f"run.name=ranking-{env}", "run.progress=false",
                    f"collect.num_steps={FRAMES[env]}", f"collect.policy_mix={MIX}",
                    f"dreamer.checkpoint_every={args.every}", f"evaluate.policies={zoo}",
                    f"evaluate.episodes={args.episodes}", f"evaluate.max_checkpoints={args.checkpoints}",
                    "evaluate.gif_policies=dreamer", *overrides]
        started = time.perf_counter()
        log(f"{env}: {FRAMES[env]} frames, zoo of {len(SCRIPTED) + 1 + args.checkpoints}+ policies")
        result = quickstart.main(argv_run)
        metrics = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())["evaluate"]
        row = {k: metrics.get(k) for k in KEYS}
        row.update({f"{k}_ci": metrics.get(f"{k}_ci") for k in KEYS if metrics.get(f"{k}_ci") is not None})
        row["wall_seconds"] = round(time.perf_counter() - started, 1)
        row["flags"] = len(metrics.get("flags", []))
        env_id = json.loads((Path(result["run_dir"]) / "dataset" / "card.json").read_text())["env_id"]
        out.setdefault(env_id, {})["full"] = row
        log(f"{env}: spearman {row['spearman']}, mae_normalized {row['mae_normalized']}, "
            f"regret_at_1 {row['regret_at_1']} over {row['num_policies']} policies")
    out["machine"] = machine()
    finish("ranking", out)
    return out


if __name__ == "__main__":
    main()
