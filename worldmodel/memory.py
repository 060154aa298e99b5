"""The allocentric token map of the egocentric view (``memory="map"`` in :mod:`worldmodel.dynamics`).

The egocentric frame is a (v, v) token grid (one token per tile), the agent at the bottom centre
facing up. A rollout keeps

- ``pose`` (B, 3) int64: the agent's (x, y, direction) relative to the first frame read, in the
  *map frame*: x to the right and y down as the first frame drew them, direction 0 = up (the first
  frame's forward), 1 = right, 2 = down, 3 = left (MiniGrid's turns: right adds one);
- ``map`` (B, M * M + 1) int64: the last token seen at every cell of an M x M square centred on the
  first position, ``unknown`` where never seen. The last entry is a trash cell, always
  ``unknown``: view cells that fall outside the square read it and write nowhere.

A frame is written at the current pose: every cell but the hidden ones (drawn black: occluded) and
the agent's own (which draws the agent and what it carries, not the floor). Reading the map at the
next pose gives what the next view would show if nothing changed: known cells are copied, cells
never seen are ``unknown`` and the decoder samples them from what the data says such cells hold.

Pure tensor functions: no parameters, no learning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Map-frame unit vectors of the four relative directions (x right, y down): up, right, down, left.
FORWARD_VECTORS = ((0, -1), (1, 0), (0, 1), (-1, 0))
TURN_LEFT, TURN_RIGHT, MOVE_FORWARD = 0, 1, 2  # MiniGrid's action ids


@dataclass
class MapState:
    """The map and the pose of a batch of rollouts."""

    map: torch.Tensor  # (B, M * M + 1) int64 tokens; ``unknown`` where never seen; last: trash
    pose: torch.Tensor  # (B, 3) int64: x, y, direction relative to the first frame


def map_size_for(grid_width: int, grid_height: int, view: int) -> int:
    """The side M of a map that holds every cell a view can show from any pose in a grid of that
    size: the agent moves at most max(W, H) - 1 cells from its start, the view reaches view - 1 ahead."""
    return 2 * (max(grid_width, grid_height) - 1 + view - 1) + 1


def empty_map(batch: int, map_size: int, unknown: int, device: torch.device | str = "cpu") -> MapState:
    """Nothing seen, the agent at the centre facing 'up'."""
    return MapState(map=torch.full((batch, map_size * map_size + 1), unknown, dtype=torch.long, device=device),
                    pose=torch.zeros(batch, 3, dtype=torch.long, device=device))


def view_cells(pose: torch.Tensor, view: int, map_size: int) -> torch.Tensor:
    """pose (B, 3) -> (B, v * v) flat map index of every view cell (row-major as the frame draws it;
    the trash index M * M where the cell falls outside the map)."""
    device = pose.device
    rows = torch.arange(view, device=device).repeat_interleave(view)
    cols = torch.arange(view, device=device).repeat(view)
    ahead = (view - 1 - rows)[None]  # (1, N) steps forward of the agent
    aside = (cols - view // 2)[None]  # (1, N) steps to its right
    vectors = torch.tensor(FORWARD_VECTORS, device=device)
    forward = vectors[pose[:, 2] % 4]  # (B, 2)
    right = vectors[(pose[:, 2] + 1) % 4]
    centre = map_size // 2
    x = pose[:, :1] + forward[:, :1] * ahead + right[:, :1] * aside + centre
    y = pose[:, 1:2] + forward[:, 1:] * ahead + right[:, 1:] * aside + centre
    inside = (x >= 0) & (x < map_size) & (y >= 0) & (y < map_size)
    return torch.where(inside, y * map_size + x, torch.full_like(x, map_size * map_size))


def write_view(state: MapState, tokens: torch.Tensor, hidden_token: int, unknown: int) -> torch.Tensor:
    """Write the frame tokens (B, v * v) seen at ``state.pose`` -> the new map (B, M * M + 1): every
    cell but the hidden ones and the agent's own (the bottom centre)."""
    n = tokens.shape[1]
    view = int(round(n ** 0.5))
    map_size = int(round((state.map.shape[1] - 1) ** 0.5))
    index = view_cells(state.pose, view, map_size)
    write = tokens != hidden_token
    write[:, n - 1 - view // 2] = False  # the agent's cell
    # Cells not written keep their value: scatter it back (every index is distinct but the trash).
    values = torch.where(write, tokens, state.map.gather(1, index))
    new = state.map.scatter(1, index, values)
    new[:, -1] = unknown
    return new


def read_view(state: MapState, view: int) -> torch.Tensor:
    """The map's tokens (B, v * v) under ``state.pose``, as the frame would draw them."""
    map_size = int(round((state.map.shape[1] - 1) ** 0.5))
    return state.map.gather(1, view_cells(state.pose, view, map_size))


def next_pose(pose: torch.Tensor, actions: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """pose (B, 3), actions (B,), moved (B,) bool (did a forward step move the agent) -> (B, 3).
    Turns are known from the action; a step forward moves one cell only where ``moved``."""
    turn = (actions == TURN_RIGHT).long() - (actions == TURN_LEFT).long()
    step = ((actions == MOVE_FORWARD) & moved).long()
    forward = torch.tensor(FORWARD_VECTORS, device=pose.device)[pose[:, 2] % 4]
    return torch.cat([pose[:, :2] + forward * step[:, None], ((pose[:, 2] + turn) % 4)[:, None]], dim=1)


def relative_poses(agent_xy: torch.Tensor, agent_dir: torch.Tensor) -> torch.Tensor:
    """True absolute poses over a window, agent_xy (B, T, 2), agent_dir (B, T) (MiniGrid: 0 east,
    1 south, ...) -> poses (B, T, 3) relative to the window's first frame, in the map frame."""
    world = torch.tensor(((1, 0), (0, 1), (-1, 0), (0, -1)), device=agent_xy.device)  # MiniGrid's DIR_TO_VEC
    forward0 = world[agent_dir[:, 0] % 4][:, None]  # (B, 1, 2)
    right0 = torch.stack([-forward0[..., 1], forward0[..., 0]], dim=-1)
    delta = agent_xy - agent_xy[:, :1]
    x = (delta * right0).sum(-1)
    y = -(delta * forward0).sum(-1)
    return torch.stack([x, y, (agent_dir - agent_dir[:, :1]) % 4], dim=-1)
