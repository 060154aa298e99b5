"""Env pools of the VAGEN-style agent: N envs stepped together with manual auto-reset, real or dreamt.

Both answer ``reset() -> (frames, states)`` and ``step(actions) -> PoolStep``, so the training loop
does not care whether its turns are real or imagined; what differs is where the "true" states that
score the agent's estimates and predictions come from (the env's symbolic state, or the world
model's state head).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.runs import RunDir
from common.seeding import derive_seed
from envs.make import make_env_from_config


@dataclass
class PoolStep:
    """One batched step. frames (N, H, W, 3) and states (N, S): the next observation (a fresh
    episode's first one where an episode ended); next_states (N, S): the state the action led to
    (before any reset); rewards (N,); dones (N,) episode over (terminated or truncated)."""

    frames: np.ndarray
    states: np.ndarray
    next_states: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    terminated: np.ndarray


class RealEnvPool:
    """``num_envs`` MiniGrid envs; episode k of env i resets with ``derive_seed(seed, i, k)``."""

    def __init__(self, env_cfg: Any, num_envs: int, seed: int):
        self.envs = [make_env_from_config(env_cfg) for _ in range(num_envs)]
        self.seed = seed
        self.episodes = [0] * num_envs
        self.frames: np.ndarray | None = None
        self.states: np.ndarray | None = None

    def _reset_one(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        frame, info = self.envs[i].reset(seed=derive_seed(self.seed, i, self.episodes[i]))
        self.episodes[i] += 1
        return frame, info["state"]

    def reset(self) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self._reset_one(i) for i in range(len(self.envs))]
        self.frames = np.stack([p[0] for p in pairs])
        self.states = np.stack([p[1] for p in pairs])
        return self.frames, self.states

    def step(self, actions: np.ndarray) -> PoolStep:
        n = len(self.envs)
        frames, states, next_states = [], [], []
        rewards, dones, terminated = np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, bool)
        for i, (env, action) in enumerate(zip(self.envs, actions)):
            frame, reward, term, trunc, info = env.step(int(action))
            next_states.append(info["state"])
            rewards[i], dones[i], terminated[i] = reward, term or trunc, term
            if term or trunc:
                frame, state = self._reset_one(i)
            else:
                state = info["state"]
            frames.append(frame)
            states.append(state)
        self.frames, self.states = np.stack(frames), np.stack(states)
        return PoolStep(self.frames, self.states, np.stack(next_states), rewards, dones, terminated)


class DreamEnvPool:
    """The dream: ``num_envs`` episodes imagined by the world model of ``vagen.world_model`` (a run
    folder with ``tokenizer.pt`` and ``dynamics.pt``; default: this run). Episodes start from real
    first frames (real env resets), then the model steps them; frames are the tokenizer's decoding.
    The "true" states that score the agent's estimates and predictions are the model's state head:
    the model's truth, not the world's. Episodes end when the model predicts termination or after
    the real env's step limit. Same interface as :class:`RealEnvPool`."""

    def __init__(self, cfg: Any, run: RunDir, num_envs: int, seed: int):
        try:
            from worldmodel.imagine import EnvStarts, load_world_model
        except ImportError as error:
            raise RuntimeError(f"vagen.world=dream needs worldmodel.imagine, which does not import: {error}") from error
        folder = Path(cfg.vagen.world_model) if cfg.vagen.world_model else run.path
        for name in ("tokenizer.pt", "dynamics.pt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"vagen.world=dream needs {folder / name}: train the tokenizer and dynamics model first, "
                    "or point vagen.world_model at a run folder that has them"
                )
        self.model = load_world_model(folder, device=cfg.run.device)
        self.starts = EnvStarts(lambda: make_env_from_config(cfg.env), self.model.tokenizer)
        self.rng = np.random.default_rng(seed)
        self.model.seed(seed)
        self.num_envs = num_envs
        self.max_steps = make_env_from_config(cfg.env).unwrapped.max_steps
        self.elapsed = np.zeros(num_envs, dtype=np.int64)
        self.seed = seed

    def _current(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.model.state is not None
        return self.model.decode(), self.model.state.cpu().numpy()

    def reset(self) -> tuple[np.ndarray, np.ndarray]:
        self.rng = np.random.default_rng(self.seed)
        tokens, _ = self.starts.sample(self.rng, self.num_envs)
        self.model.reset(tokens)
        self.elapsed[:] = 0
        return self._current()

    def step(self, actions: np.ndarray) -> PoolStep:
        result = self.model.step(actions)
        next_states = result.state.cpu().numpy()
        rewards = result.reward.cpu().numpy().astype(np.float32)
        terminated = result.terminated.cpu().numpy().astype(bool)
        self.elapsed += 1
        dones = terminated | (self.elapsed >= self.max_steps)
        if dones.any():
            tokens, _ = self.starts.sample(self.rng, int(dones.sum()))
            self.model.reset_rows(dones, tokens)
            self.elapsed[dones] = 0
        frames, states = self._current()
        return PoolStep(frames, states, next_states, rewards, dones, terminated)



def make_pool(cfg: Any, run: RunDir, seed: int) -> RealEnvPool | DreamEnvPool:
    """The env pool the agent trains in: the real env, or the world model's dream (``vagen.world``)."""
    vcfg = cfg.vagen
    if vcfg.world == "real":
        return RealEnvPool(cfg.env, vcfg.num_envs, seed)
    if vcfg.world == "dream":
        return DreamEnvPool(cfg, run, vcfg.num_envs, seed)
    raise ValueError(f"vagen.world must be 'real' or 'dream', got '{vcfg.world}'")
