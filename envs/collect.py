"""Rollout collection: roll a behaviour-policy mix in gymnasium vector envs and write dataset shards.

Every episode is a pure function of its index i: the env resets with seed ``collect.seed + i`` and
the policy (drawn from the mix) acts with a generator seeded from (seed, i). Episodes are written in
index order, ``episodes_per_shard`` to a shard, so the same config gives the same dataset byte for
byte whatever the number of parallel envs, and a killed collection resumes at its first missing
shard. ``card.json`` is written last and marks the dataset complete.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from common.atomic import ArtifactError, atomic_write_json
from common.config import param
from common.runs import package_versions
from common.seeding import derive_seed
from common.stage import file_sha256
from envs.dataset import CARD_NAME, Episode, dataset_content, read_card, read_shard_lengths, shard_name, write_shard
from envs.make import make_env, normalize_env_id
from envs.oracle import Task, task_for_env
from envs.policies import PolicySpec, parse_policy_mix
from envs.state import StateCodec

IDENTITY_NAME = "collect_config.json"


@dataclass
class CollectConfig:
    """Offline rollout collection."""

    num_episodes: int = param(200, "episodes to collect (ignored when num_steps > 0)", min=1)
    num_steps: int = param(0, "if > 0: collect episodes in order until this many env steps are reached", min=0)
    policy_mix: str = param(
        "random:0.5,epsilon_oracle@0.3:0.3,sticky_random@0.75:0.2",
        "behaviour policies name[@parameter]:weight, comma separated: random, sticky_random@P (repeat "
        "probability), epsilon_oracle@EPS (random-action probability), oracle",
    )
    seed: int = param(0, "env seed of episode 0; episode i resets with seed + i", min=0)
    num_envs: int = param(8, "parallel envs in the vector env", min=1)
    async_envs: bool = param(False, "AsyncVectorEnv (one process per env) instead of SyncVectorEnv")
    episodes_per_shard: int = param(64, "episodes per .npz shard (a shard is the unit of resuming)", min=1)
    path: str = param("", "dataset folder (default: <run folder>/dataset)")


def random_frames(env_id: str, seeds: Any, steps: int, obs: str = "full") -> np.ndarray:
    """Frames (N, H, W, 3) uint8 of uniform-random episodes of at most ``steps`` steps, one reset per
    seed (actions uniform over the env's own action space, from a generator seeded by the first
    seed): quick frames for tests and benchmarks."""
    seeds = list(seeds)
    env = make_env(env_id, obs=obs)
    rng = np.random.default_rng(seeds[0])
    num_actions = int(env.action_space.n)  # 3 in Dynamic-Obstacles, 7 elsewhere
    frames = []
    for seed in seeds:
        frame, _ = env.reset(seed=seed)
        frames.append(frame)
        for _ in range(steps):
            frame, _, terminated, truncated, _ = env.step(int(rng.integers(num_actions)))
            frames.append(frame)
            if terminated or truncated:
                break
    return np.stack(frames)


def dataset_identity(env_cfg: Any, collect_cfg: Any) -> dict:
    """What determines a dataset's content (not how fast it was made): resumes must match it."""
    return {
        "env_id": normalize_env_id(env_cfg.id),
        "obs": env_cfg.obs,
        "tile_size": int(env_cfg.tile_size),
        "max_steps": int(env_cfg.max_steps),
        "num_episodes": int(collect_cfg.num_episodes) if collect_cfg.num_steps <= 0 else None,
        "num_steps": int(collect_cfg.num_steps) if collect_cfg.num_steps > 0 else None,
        "policy_mix": [spec.label + f":{spec.weight:.6g}" for spec in parse_policy_mix(collect_cfg.policy_mix)],
        "seed": int(collect_cfg.seed),
        "episodes_per_shard": int(collect_cfg.episodes_per_shard),
    }


def _check_identity(folder: Path, identity: dict) -> None:
    path = folder / IDENTITY_NAME
    if not path.is_file():
        if any(folder.glob("shard_*.npz")):
            raise ArtifactError(f"{folder} holds shards but no {IDENTITY_NAME}: not a dataset this code wrote "
                                "(use another collect.path or delete the folder)")
        atomic_write_json(path, identity)
        return
    try:
        existing = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path} cannot be read ({error}): delete the dataset folder {folder} to recollect") from None
    differences = {k: (existing.get(k), v) for k, v in identity.items() if existing.get(k) != v}
    if differences:
        detail = ", ".join(f"{k}: {old!r} on disk vs {new!r} asked" for k, (old, new) in differences.items())
        raise ArtifactError(
            f"dataset {folder} holds a partial collection of another config ({detail}); "
            "use another run name or collect.path, or delete the folder"
        )


class _Slot:
    """The episode being recorded in one env of the vector env."""

    def __init__(self, index: int, seed: int, policy_id: int, policy, rng: np.random.Generator):
        self.index, self.seed, self.policy_id, self.policy = index, seed, policy_id, policy
        self.policy.reset(rng)
        self.frames: list[np.ndarray] = []
        self.states: list[np.ndarray] = []
        self.actions: list[int] = []
        self.rewards: list[float] = []
        self.terminated: list[bool] = []
        self.truncated: list[bool] = []

    def finish(self) -> Episode:
        return Episode(
            frames=np.stack(self.frames), states=np.stack(self.states),
            actions=np.array(self.actions, dtype=np.int64), rewards=np.array(self.rewards, dtype=np.float32),
            terminated=np.array(self.terminated, dtype=bool), truncated=np.array(self.truncated, dtype=bool),
            seed=self.seed, policy=self.policy_id, index=self.index,
        )


def _episode_plan(specs: list[PolicySpec], seed: int, index: int) -> tuple[int, np.random.Generator]:
    """The policy of episode ``index`` and the generator it acts with: a function of (seed, index)."""
    rng = np.random.default_rng(derive_seed(seed, index))
    policy_id = int(rng.choice(len(specs), p=[s.weight for s in specs]))
    return policy_id, rng


def collect(env_cfg: Any, collect_cfg: Any, folder: str | Path, progress: bool = True) -> dict:
    """Collect (or finish collecting) the dataset in ``folder``; return its card."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    identity = dataset_identity(env_cfg, collect_cfg)
    _check_identity(folder, identity)
    card_path = folder / CARD_NAME
    if card_path.is_file():  # a finished collection: trusted only once its shards are checked
        dataset_content(folder, env_cfg)
        return read_card(folder)
    if collect_cfg.num_steps <= 0 and collect_cfg.num_episodes <= 0:
        raise ValueError("collect: set num_episodes > 0 or num_steps > 0")
    if collect_cfg.episodes_per_shard <= 0 or collect_cfg.num_envs <= 0:
        raise ValueError("collect: episodes_per_shard and num_envs must be positive")

    specs = parse_policy_mix(collect_cfg.policy_mix)
    per_shard = int(collect_cfg.episodes_per_shard)
    seed = int(collect_cfg.seed)
    step_budget = int(collect_cfg.num_steps)
    target_episodes = None if step_budget > 0 else int(collect_cfg.num_episodes)

    # ---- resume: complete shards are kept, collection restarts at the first missing one
    lengths: list[int] = []
    shard = 0
    while (folder / shard_name(shard)).is_file():
        try:
            lengths.extend(int(n) for n in read_shard_lengths(folder / shard_name(shard)))
        except Exception as error:  # a shard damaged after it was written
            raise ArtifactError(f"dataset shard {folder / shard_name(shard)} cannot be read ({type(error).__name__}): "
                                "delete it and rerun scripts/collect.py to recollect it") from None
        shard += 1
    done_episodes = len(lengths)
    if done_episodes % per_shard:
        raise ArtifactError(f"{folder}: shard {shard - 1} is partial but the dataset has no card; delete it to resume")
    if step_budget > 0 and sum(lengths) >= step_budget:
        target_episodes = int(np.searchsorted(np.cumsum(lengths), step_budget) + 1)

    factory = functools.partial(
        make_env, env_cfg.id, obs=env_cfg.obs, tile_size=env_cfg.tile_size, max_steps=env_cfg.max_steps
    )
    vector_cls = gym.vector.AsyncVectorEnv if collect_cfg.async_envs else gym.vector.SyncVectorEnv
    num_envs = int(collect_cfg.num_envs)
    if target_episodes is not None:
        num_envs = max(1, min(num_envs, target_episodes - done_episodes))
    probe = factory()
    codec: StateCodec = probe.codec
    num_actions = int(probe.action_space.n)
    task: Task = task_for_env(probe)  # what the oracle plans for: the same for every episode of an env
    probe.close()

    bar = None
    if progress:
        from tqdm import tqdm

        total = step_budget if step_budget > 0 else None
        bar = tqdm(total=total, initial=min(sum(lengths), step_budget) if total else 0,
                   desc="collect", unit="step", dynamic_ncols=True)

    finished: dict[int, Episode] = {}
    next_index = done_episodes
    if target_episodes is None or done_episodes < target_episodes:
        venv = vector_cls([factory] * num_envs, autoreset_mode=AutoresetMode.DISABLED)
        try:
            next_index, lengths = _run(
                venv, specs, codec, num_actions, task, seed, per_shard, folder, lengths, next_index,
                target_episodes, step_budget, finished, bar,
            )
        finally:
            venv.close()
    if bar is not None:
        bar.close()
    return _write_card(folder, env_cfg, collect_cfg, specs, identity, codec, num_actions)


def _run(venv, specs, codec, num_actions, task, seed, per_shard, folder, lengths, next_index,
         target_episodes, step_budget, finished, bar):
    """Step the vector env until the target is reached, writing shards in episode order."""
    num_envs = venv.num_envs
    policies = [[spec.build(num_actions, codec, task) for spec in specs] for _ in range(num_envs)]
    slots: list[_Slot | None] = [None] * num_envs
    written = len(lengths)  # episodes already in complete shards

    def launch(mask: np.ndarray) -> tuple[np.ndarray, dict]:
        nonlocal next_index
        seeds: list[int | None] = [None] * num_envs
        for i in np.flatnonzero(mask):
            policy_id, rng = _episode_plan(specs, seed, next_index)
            slots[i] = _Slot(next_index, seed + next_index, policy_id, policies[i][policy_id], rng)
            seeds[i] = seed + next_index
            next_index += 1
        return venv.reset(seed=seeds, options={"reset_mask": mask})

    obs, info = launch(np.ones(num_envs, dtype=bool))
    for i in range(num_envs):
        slots[i].frames.append(obs[i])
        slots[i].states.append(info["state"][i])
    while target_episodes is None or written < target_episodes:
        actions = np.array([slot.policy.act(slot.states[-1]) for slot in slots], dtype=np.int64)
        obs, rewards, terminated, truncated, info = venv.step(actions)
        done = terminated | truncated
        for i, slot in enumerate(slots):
            slot.actions.append(int(actions[i]))
            slot.rewards.append(float(rewards[i]))
            slot.terminated.append(bool(terminated[i]))
            slot.truncated.append(bool(truncated[i]))
            slot.frames.append(obs[i])
            slot.states.append(info["state"][i])
            if done[i]:
                finished[slot.index] = slot.finish()
        if bar is not None:
            bar.update(num_envs if step_budget > 0 else 0)
        # ---- flush complete shards in episode order; settle the episode count for a step budget
        while True:
            shard_range = range(written, written + per_shard)
            if target_episodes is not None:
                shard_range = range(written, min(written + per_shard, target_episodes))
            if len(shard_range) == 0 or any(k not in finished for k in shard_range):
                break
            episodes = [finished.pop(k) for k in shard_range]
            if step_budget > 0 and target_episodes is None:
                cumulative = np.cumsum(lengths + [e.length for e in episodes])
                if cumulative[-1] >= step_budget:
                    target_episodes = int(np.searchsorted(cumulative, step_budget) + 1)
                    episodes = [e for e in episodes if e.index < target_episodes]
            write_shard(folder, written // per_shard, episodes)
            lengths = lengths + [e.length for e in episodes]
            written += len(episodes)
            if bar is not None and step_budget <= 0:
                bar.set_postfix(episodes=written)
            if target_episodes is not None and written >= target_episodes:
                break
        if done.any() and (target_episodes is None or next_index < target_episodes):
            obs, info = launch(done)
            for i in np.flatnonzero(done):
                slots[i].frames.append(obs[i])
                slots[i].states.append(info["state"][i])
        elif done.any():
            # Nothing left to launch: keep stepping the finished env on a throwaway episode so the
            # vector env stays in step; the result is never written.
            obs, info = venv.reset(seed=[None] * num_envs, options={"reset_mask": done})
            for i in np.flatnonzero(done):
                policy_id, rng = _episode_plan(specs, seed, 10**9 + i)
                slots[i] = _Slot(-1, -1, policy_id, policies[i][policy_id], rng)
                slots[i].frames.append(obs[i])
                slots[i].states.append(info["state"][i])
    return next_index, lengths


def _write_card(folder: Path, env_cfg, collect_cfg, specs, identity, codec, num_actions: int) -> dict:
    shards = sorted(folder.glob("shard_*.npz"))
    returns, lengths, policies, successes = [], [], [], []
    frame_shape = None
    for path in shards:
        with np.load(path) as shard:
            episode_lengths = shard["episode_lengths"]
            rewards = shard["rewards"].astype(np.float64)
            terminated = shard["terminated"]
            starts = np.concatenate([[0], np.cumsum(episode_lengths + 1)[:-1]])
            returns.extend(np.add.reduceat(rewards, starts).tolist())
            successes.extend((np.add.reduceat(rewards, starts) > 0).tolist())
            del terminated
            lengths.extend(episode_lengths.tolist())
            policies.extend(shard["episode_policies"].tolist())
            frame_shape = list(shard["frames"].shape[1:]) if frame_shape is None else frame_shape
    returns_a, lengths_a, policies_a = np.array(returns), np.array(lengths), np.array(policies)

    def stats(mask: np.ndarray) -> dict:
        if not mask.any():
            return {"episodes": 0}
        r = returns_a[mask]
        return {
            "episodes": int(mask.sum()), "steps": int(lengths_a[mask].sum()),
            "return_mean": float(r.mean()), "return_std": float(r.std()),
            "return_min": float(r.min()), "return_max": float(r.max()),
            "success_rate": float(np.mean(np.array(successes)[mask])),
            "length_mean": float(lengths_a[mask].mean()),
        }

    card = {
        "env_id": identity["env_id"],
        "obs": env_cfg.obs,
        "tile_size": int(env_cfg.tile_size),
        "frame_shape": frame_shape,
        "grid_size": [codec.width, codec.height],
        "state_size": codec.size,
        "num_actions": int(num_actions),
        "policy_mix": [{"name": s.name, "parameter": s.parameter, "weight": s.weight, "label": s.label}
                       for s in specs],
        "seeds": {"first": int(collect_cfg.seed), "last": int(collect_cfg.seed) + len(returns) - 1},
        "episodes": len(returns),
        "steps": int(lengths_a.sum()),
        "frames": int(lengths_a.sum() + len(returns)),
        "shards": [p.name for p in shards],
        "shard_sha256": {p.name: file_sha256(p) for p in shards},
        "returns": stats(np.ones(len(returns), dtype=bool)),
        "returns_by_policy": {s.label: stats(policies_a == i) for i, s in enumerate(specs)},
        "identity": identity,
        "versions": package_versions(),
    }
    atomic_write_json(folder / CARD_NAME, card)
    return card


def format_card(card: dict) -> str:
    """A few human-readable lines about a dataset."""
    r = card["returns"]
    lines = [
        f"dataset: {card['env_id']} ({card['obs']} view, frames {tuple(card['frame_shape'])})",
        f"  episodes {card['episodes']}, steps {card['steps']}, frames {card['frames']}, shards {len(card['shards'])}",
        f"  seeds {card['seeds']['first']}..{card['seeds']['last']}",
        f"  return mean {r['return_mean']:.3f} ± {r['return_std']:.3f}, success {r['success_rate']:.1%}",
    ]
    for label, s in card["returns_by_policy"].items():
        if s.get("episodes"):
            lines.append(f"    {label}: {s['episodes']} episodes, return {s['return_mean']:.3f}, "
                         f"success {s['success_rate']:.1%}, length {s['length_mean']:.1f}")
    return "\n".join(lines)
