"""MiniGrid's native observation, rebuilt from the symbolic state.

MiniGrid's own agents read ``env.gen_obs()``: ``{"image": (7, 7, 3) uint8, "direction": int}``, the
agent's egocentric 7x7 view encoded per cell as (object, colour, state), cells hidden behind walls
and closed doors zeroed (``see_through_walls=False``), the carried object drawn at the agent's cell.
The sandbox's world model predicts symbolic states, not MiniGrid objects, so this module computes
the same observation from a :class:`envs.state.SymbolicState` (or a batch of encoded state arrays):
it exists in the real env and in imagination (from the model's state head) alike.

The steps follow ``MiniGridEnv.gen_obs_grid`` and ``Grid.process_vis`` (minigrid 2.x / 3.x):

1. slice the ``view`` x ``view`` square in front of the agent (``get_view_exts``), cells outside
   the grid being walls;
2. rotate it left ``agent_dir + 1`` times, so the agent sits at (view // 2, view - 1) facing up;
3. spread visibility from the agent's cell row by row, away from the agent, stopping at cells one
   cannot see behind (walls, closed or locked doors);
4. put the carried object (or an empty cell) at the agent's cell, zero every hidden cell.

A predicted state may be impossible (an agent off the grid, a direction past 3, unknown object
ids): the builder never fails on one, it sees walls off the grid and reads the direction mod 4.
"""

from __future__ import annotations

import numpy as np

from envs.state import DOOR, DOOR_OPEN, WALL, StateCodec, SymbolicState

VIEW_SIZE = 7  # MiniGrid's default agent_view_size
WALL_CELL = (WALL, 5, 0)  # Wall() encodes as (wall, grey, 0): what lies outside the grid


def _view_coordinates(agent_x: np.ndarray, agent_y: np.ndarray, agent_dir: np.ndarray, view: int) -> tuple[np.ndarray, np.ndarray]:
    """World coordinates (B, view, view) of every cell of the rotated egocentric view."""
    half = view // 2
    offsets = np.arange(view)
    # get_view_exts: the top-left corner of the square in front of the agent, per direction.
    top_x = np.select([agent_dir == 0, agent_dir == 1, agent_dir == 2], [agent_x, agent_x - half, agent_x - view + 1],
                      agent_x - half)
    top_y = np.select([agent_dir == 0, agent_dir == 1, agent_dir == 2], [agent_y - half, agent_y, agent_y - half],
                      agent_y - view + 1)
    xs = top_x[:, None, None] + offsets[None, :, None] + 0 * offsets[None, None, :]
    ys = top_y[:, None, None] + 0 * offsets[None, :, None] + offsets[None, None, :]
    # Grid.rotate_left: new[i, j] = old[view - 1 - j, i], applied agent_dir + 1 times.
    for turns in range(1, 5):
        rows = (agent_dir + 1) >= turns
        xs = np.where(rows[:, None, None], xs.transpose(0, 2, 1)[:, :, ::-1], xs)
        ys = np.where(rows[:, None, None], ys.transpose(0, 2, 1)[:, :, ::-1], ys)
    return xs, ys


def _visibility(see_behind: np.ndarray) -> np.ndarray:
    """``Grid.process_vis`` on a batch: (B, view, view) bool of cells one can see behind -> visible."""
    count, width, height = see_behind.shape
    mask = np.zeros((count, width, height), dtype=bool)
    mask[:, width // 2, height - 1] = True
    for j in reversed(range(height)):
        for i in range(width - 1):
            spread = mask[:, i, j] & see_behind[:, i, j]
            mask[:, i + 1, j] |= spread
            if j > 0:
                mask[:, i + 1, j - 1] |= spread
                mask[:, i, j - 1] |= spread
        for i in reversed(range(1, width)):
            spread = mask[:, i, j] & see_behind[:, i, j]
            mask[:, i - 1, j] |= spread
            if j > 0:
                mask[:, i - 1, j - 1] |= spread
                mask[:, i, j - 1] |= spread
    return mask


def native_observations(states: np.ndarray, codec: StateCodec | None = None, view: int = VIEW_SIZE) -> dict[str, np.ndarray]:
    """MiniGrid's ``gen_obs()`` for a batch of encoded states (B, S) (any integer dtype).

    Returns ``{"image": (B, view, view, 3) uint8, "direction": (B,) int64}``; ``codec`` defaults to
    the square grid the state length implies.
    """
    states = np.asarray(states)
    if states.ndim != 2:
        raise ValueError(f"states must be (B, S), got shape {states.shape}")
    codec = codec or StateCodec.for_array_size(states.shape[1])
    count = len(states)
    grid = np.clip(states[:, : codec.grid_size], 0, 255).astype(np.uint8).reshape(count, codec.width, codec.height, 3)
    agent = states[:, codec.grid_size : codec.grid_size + 3].astype(np.int64)
    carrying = np.clip(states[:, codec.grid_size + 3 :], 0, 255).astype(np.uint8)
    direction = agent[:, 2] % 4
    xs, ys = _view_coordinates(agent[:, 0], agent[:, 1], direction, view)

    inside = (xs >= 0) & (xs < codec.width) & (ys >= 0) & (ys < codec.height)
    rows = np.arange(count)[:, None, None]
    image = grid[rows, np.clip(xs, 0, codec.width - 1), np.clip(ys, 0, codec.height - 1)]  # (B, view, view, 3)
    image[~inside] = WALL_CELL
    kind, state = image[..., 0], image[..., 2]
    see_behind = (kind != WALL) & ((kind != DOOR) | (state == DOOR_OPEN))
    visible = _visibility(see_behind)
    image[:, view // 2, view - 1] = carrying  # (EMPTY, 0, 0) when empty-handed, as MiniGrid's empty cell
    image[~visible] = 0
    return {"image": image, "direction": direction}


def native_observation(state: SymbolicState, view: int = VIEW_SIZE) -> dict[str, np.ndarray | int]:
    """MiniGrid's ``gen_obs()`` (without the mission) for one decoded state: ``{"image": (view,
    view, 3) uint8, "direction": int}``."""
    codec = StateCodec(state.width, state.height)
    batch = native_observations(codec.encode(state)[None], codec, view)
    return {"image": batch["image"][0], "direction": int(batch["direction"][0])}

