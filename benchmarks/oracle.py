#!/usr/bin/env python
"""Oracle and uniform-random returns over 200 seeds (0..199) per env: the bounds every report uses.

    python benchmarks/oracle.py [--seeds 200] [--envs MiniGrid-DoorKey-5x5-v0 ...]

Prints progress per env and one JSON object last:
``{env_id: {"oracle_return", "random_return", "oracle_length", "oracle_success", ...}}``.
Runs on the symbolic state only (no rendering): frames do not change returns.
"""

from __future__ import annotations

import argparse
import sys
import time

import _common  # noqa: F401
import gymnasium as gym
import numpy as np

from common.seeding import derive_seed
from envs.make import normalize_env_id
from envs.oracle import Oracle
from envs.policies import RandomPolicy
from envs.state import StateCodec, state_from_env

ENVS = [
    "MiniGrid-Empty-5x5-v0", "MiniGrid-Empty-8x8-v0", "MiniGrid-DoorKey-5x5-v0", "MiniGrid-DoorKey-6x6-v0",
    "MiniGrid-DoorKey-8x8-v0", "MiniGrid-FourRooms-v0", "MiniGrid-LavaGapS5-v0", "MiniGrid-LavaGapS7-v0",
    "MiniGrid-MultiRoom-N2-S4-v0",
]


def _or_done(action: int | None) -> int:
    return 6 if action is None else action  # unsolvable state: "done" is a no-op


def episode(env, codec, act, seed: int) -> tuple[float, int, bool]:
    env.reset(seed=seed)
    total, steps = 0.0, 0
    while True:
        _, reward, terminated, truncated, _ = env.step(act(codec.encode(state_from_env(env))))
        total += float(reward)
        steps += 1
        if terminated or truncated:
            return total, steps, bool(terminated and reward > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--envs", nargs="*", default=ENVS)
    args = parser.parse_args()
    result = {}
    for env_id in map(normalize_env_id, args.envs):
        start = time.perf_counter()
        env = gym.make(env_id)
        base = env.unwrapped
        codec = StateCodec(base.width, base.height)
        oracle = Oracle(codec)
        random_policy = RandomPolicy(int(env.action_space.n))
        oracle_runs, random_runs = [], []
        for seed in range(args.seeds):
            oracle.reset()
            oracle_runs.append(episode(env, codec, lambda s, oracle=oracle: _or_done(oracle.action(s)), seed))
            random_policy.reset(np.random.default_rng(derive_seed(seed, 1)))
            random_runs.append(episode(env, codec, random_policy.act, seed))
        o = np.array(oracle_runs, dtype=np.float64)
        r = np.array(random_runs, dtype=np.float64)
        result[env_id] = {
            "oracle_return": round(float(o[:, 0].mean()), 4),
            "oracle_return_std": round(float(o[:, 0].std()), 4),
            "oracle_length": round(float(o[:, 1].mean()), 2),
            "oracle_success": round(float(o[:, 2].mean()), 4),
            "random_return": round(float(r[:, 0].mean()), 4),
            "random_return_std": round(float(r[:, 0].std()), 4),
            "random_success": round(float(r[:, 2].mean()), 4),
            "seeds": args.seeds,
        }
        print(f"{env_id}: oracle {o[:, 0].mean():.3f} (length {o[:, 1].mean():.1f}, success {o[:, 2].mean():.0%}), "
              f"random {r[:, 0].mean():.3f} ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    _common.finish("oracle", result)


if __name__ == "__main__":
    main()
