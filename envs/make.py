"""The env factory: any MiniGrid id as a gymnasium env with RGB frame observations.

Observation: an RGB uint8 frame, by default the full-grid top-down render (fully observable, so the
next frame is determined by frame and action), or the agent's egocentric view (``obs="partial"``).
Every ``reset`` and ``step`` puts the symbolic state in ``info["state"]`` (a uint8 array, see
:mod:`envs.state`), so datasets, oracles and state heads share one ground truth.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import minigrid  # noqa: F401  (registers the MiniGrid ids)
import numpy as np
from gymnasium import spaces

from common.config import param
from envs.state import StateCodec, SymbolicState, state_from_env

OBS_MODES = ("full", "partial")


@dataclass
class EnvConfig:
    """Which environment, and how it is observed."""

    id: str = param("MiniGrid-DoorKey-5x5-v0", "gymnasium id of a MiniGrid env (short forms like DoorKey-5x5 work)")
    obs: str = param("full", "observation: full (top-down render of the whole grid) or partial (egocentric view)",
                     choices=OBS_MODES)
    tile_size: int = param(8, "pixels per grid tile in the rendered frame", min=1)
    max_steps: int = param(0, "episode step limit (0: the env's own default)", min=0)


def normalize_env_id(env_id: str) -> str:
    """Return the registered MiniGrid id for ``env_id`` or raise a ValueError with close matches.

    ``DoorKey-5x5`` and ``MiniGrid-DoorKey-5x5`` expand to ``MiniGrid-DoorKey-5x5-v0``.
    """
    registry = gym.envs.registry
    candidates = [env_id, f"{env_id}-v0", f"MiniGrid-{env_id}", f"MiniGrid-{env_id}-v0"]
    for candidate in candidates:
        if candidate in registry:
            spec = registry[candidate]
            entry = str(spec.entry_point)
            if "minigrid" not in entry.lower():
                raise ValueError(f"env id '{env_id}' is not a MiniGrid env (entry point {entry})")
            return candidate
    known = [k for k in registry if k.startswith("MiniGrid-")]
    close = difflib.get_close_matches(env_id, known, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown env id '{env_id}'{hint}")


def _unused_observation() -> None:
    return None


class FrameObservation(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """MiniGrid env whose observation is an RGB frame and whose info carries the symbolic state.

    observation_space: Box(0, 255, (H_px, W_px, 3), uint8); full view: H_px = grid height *
    tile_size, W_px = grid width * tile_size; partial view: agent_view_size * tile_size squared.
    action_space: the env's own: Discrete(7) (left, right, forward, pickup, drop, toggle, done) in
    most, Discrete(3) (left, right, forward) in Dynamic-Obstacles.
    info["state"]: (width * height * 3 + 6,) uint8, see :class:`envs.state.StateCodec`.
    """

    def __init__(self, env: gym.Env, obs: str = "full", tile_size: int = 8):
        gym.utils.RecordConstructorArgs.__init__(self, obs=obs, tile_size=tile_size)
        gym.Wrapper.__init__(self, env)
        if obs not in OBS_MODES:
            raise ValueError(f"unknown observation mode '{obs}': choose one of {OBS_MODES}")
        base = env.unwrapped
        self.obs_mode = obs
        self.tile_size = int(tile_size)
        if obs == "full":
            shape = (base.height * tile_size, base.width * tile_size, 3)
        else:
            shape = (base.agent_view_size * tile_size, base.agent_view_size * tile_size, 3)
        self.observation_space = spaces.Box(0, 255, shape=shape, dtype=np.uint8)
        self.codec = StateCodec(base.width, base.height)
        # MiniGrid computes its own symbolic partial observation on every reset and step (about a
        # third of a step's time); this wrapper renders its own frame and never reads it.
        base.gen_obs = _unused_observation

    def frame(self) -> np.ndarray:
        base = self.env.unwrapped
        if self.obs_mode == "full":
            # == get_full_render(highlight=False), without computing the unused highlight mask.
            return base.grid.render(self.tile_size, base.agent_pos, base.agent_dir)
        return base.get_pov_render(tile_size=self.tile_size)

    def symbolic_state(self) -> SymbolicState:
        return state_from_env(self.env)

    def _info(self, info: dict[str, Any]) -> dict[str, Any]:
        info = dict(info)
        info["state"] = self.codec.encode(self.symbolic_state())
        return info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        _, info = self.env.reset(seed=seed, options=options)
        return self.frame(), self._info(info)

    def step(self, action):
        _, reward, terminated, truncated, info = self.env.step(action)
        return self.frame(), float(reward), bool(terminated), bool(truncated), self._info(info)

    def render(self):
        return self.frame()


def make_env(
    env_id: str = "MiniGrid-DoorKey-5x5-v0",
    obs: str = "full",
    tile_size: int = 8,
    seed: int | None = None,
    max_steps: int = 0,
) -> FrameObservation:
    """Build a MiniGrid env with RGB frame observations and ``info["state"]``.

    ``seed`` (optional) seeds the first ``reset``; every later ``reset`` should pass its own seed.
    ``max_steps`` > 0 overrides the env's step limit.
    """
    env_id = normalize_env_id(env_id)
    if obs not in OBS_MODES:
        raise ValueError(f"unknown observation mode '{obs}': choose one of {OBS_MODES}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    # The passive checker would inspect MiniGrid's own observation, which this wrapper replaces.
    kwargs: dict[str, Any] = {"render_mode": "rgb_array", "disable_env_checker": True}
    if max_steps > 0:
        kwargs["max_steps"] = int(max_steps)
    env = FrameObservation(gym.make(env_id, **kwargs), obs=obs, tile_size=tile_size)
    if seed is not None:
        env.reset(seed=seed)
    return env


def make_env_from_config(env_cfg: Any, seed: int | None = None) -> FrameObservation:
    """``make_env`` from an :class:`EnvConfig` (or its DictConfig)."""
    return make_env(env_cfg.id, obs=env_cfg.obs, tile_size=env_cfg.tile_size, seed=seed, max_steps=env_cfg.max_steps)


def env_from_state(
    env_id: str,
    state_array: np.ndarray,
    obs: str = "full",
    tile_size: int = 8,
    seed: int = 0,
    max_steps: int = 0,
) -> FrameObservation:
    """A ``make_env`` env put into the symbolic state ``state_array`` ((S,) integers, see
    :mod:`envs.state`), so that it renders, and steps on, from that state.

    The env is reset with ``seed`` (which picks the mission and the random stream of what follows),
    then its grid, agent position and direction and carried object are overwritten from the
    decoded state; door states come with the grid. The full-view frame equals the frame of any env
    in that state. What the state does not hold starts afresh: the step count is 0 and a box's
    contents are lost. Env attributes that point into the grid are re-pointed at the new objects:
    Dynamic-Obstacles' ``obstacles`` (its balls) and KeyCorridor's ``obj`` (the ball of the
    mission's colour, carried or on the grid).
    """
    env = make_env(env_id, obs=obs, tile_size=tile_size, max_steps=max_steps)
    env.reset(seed=seed)
    return put_state(env, state_array)


def put_state(env: FrameObservation, state_array: np.ndarray) -> FrameObservation:
    """Overwrite a reset ``make_env`` env with the symbolic state ``state_array`` (what
    :func:`env_from_state` does after its reset; about 10x cheaper than building a new env, so a
    search that tries every action from many states reuses one env)."""
    from minigrid.core.grid import Grid
    from minigrid.core.world_object import WorldObj

    base = env.unwrapped
    state = env.codec.decode(state_array)
    grid, _ = Grid.decode(state.grid)
    for x in range(grid.width):
        for y in range(grid.height):
            cell = grid.get(x, y)
            if cell is not None:
                cell.init_pos = cell.cur_pos = (x, y)
    base.grid = grid
    base.agent_pos = tuple(int(v) for v in state.agent_pos)
    base.agent_dir = int(state.agent_dir)
    base.carrying = WorldObj.decode(*state.carrying)
    if base.carrying is not None:
        base.carrying.cur_pos = np.array([-1, -1])  # as MiniGrid's pickup leaves it
    base.step_count = 0
    if hasattr(base, "obstacles"):  # Dynamic-Obstacles moves the balls it lists, every step
        base.obstacles = [cell for cell in grid.grid if cell is not None and cell.type == "ball"]
    target = getattr(base, "obj", None)
    if target is not None:  # KeyCorridor rewards picking up this very object
        candidates = [base.carrying] + list(grid.grid)
        matches = [c for c in candidates if c is not None and (c.type, c.color) == (target.type, target.color)]
        base.obj = matches[0] if matches else target
    return env
