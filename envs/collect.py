"""Rollout collection: roll a behaviour-policy mix in gymnasium vector envs and write dataset shards."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import param


@dataclass
class CollectConfig:
    """Offline rollout collection."""

    num_episodes: int = param(200, "episodes to collect (ignored when num_steps > 0)")
    num_steps: int = param(0, "if > 0: collect episodes in order until this many env steps are reached")
    policy_mix: str = param(
        "random:1",
        "behaviour policies and weights, e.g. 'random:0.5,epsilon_oracle@0.3:0.3,sticky_random@0.8:0.2'",
    )
    seed: int = param(0, "env seed of episode 0; episode i resets with seed + i")
    num_envs: int = param(8, "parallel envs in the vector env")
    async_envs: bool = param(False, "AsyncVectorEnv (one process per env) instead of SyncVectorEnv")
    episodes_per_shard: int = param(64, "episodes per .npz shard (a shard is the unit of resuming)")
    path: str = param("", "dataset folder (default: <run folder>/dataset)")
