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

from envs.state import DOOR, GOAL, LAVA, WALL

# Map-frame unit vectors of the four relative directions (x right, y down): up, right, down, left.
FORWARD_VECTORS = ((0, -1), (1, 0), (0, 1), (-1, 0))
TURN_LEFT, TURN_RIGHT, MOVE_FORWARD = 0, 1, 2  # MiniGrid's action ids


@dataclass
class MapState:
    """The map and the pose of a batch of rollouts."""

    map: torch.Tensor  # (B, M * M + 1) int64 tokens; ``unknown`` where never seen; last: trash
    pose: torch.Tensor  # (B, 3) int64: x, y, direction relative to the first frame
    # Where the map is placed in the world (:func:`place`; None: not computed): the placement (B,)
    # (-1: none yet) and the structure (B, W * H) every layout fitting there agrees on (-1: they differ).
    placement: torch.Tensor | None = None
    agreed: torch.Tensor | None = None


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


# ---------------------------------------------------------------------------------------------
# Placing the map in the world (the egocentric state head)
# ---------------------------------------------------------------------------------------------
# The map is relative to the first frame's pose. Where the seen cells' structure (wall, door, goal,
# lava, floor) fits one of the env's layouts at exactly one placement of that pose, the map states
# the world: the agent's absolute pose and the content of every cell the map holds.

WORLD_VECTORS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # MiniGrid's DIR_TO_VEC: east, south, west, north


def placements(width: int, height: int, map_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every placement of the first frame's pose in a W x H world: a MiniGrid direction and an
    interior cell -> origins (P, 3) (x0, y0, direction) and index (P, W * H): the flat map index of
    every world cell (x-major, as the state lists cells), the trash index where it falls outside the map."""
    centre = map_size // 2
    xs, ys = torch.meshgrid(torch.arange(width), torch.arange(height), indexing="ij")
    world = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # (W * H, 2)
    origins, index = [], []
    for direction in range(4):
        forward = torch.tensor(WORLD_VECTORS[direction])
        right = torch.stack([-forward[1], forward[0]])
        for x0 in range(1, width - 1):
            for y0 in range(1, height - 1):
                delta = world - torch.tensor([x0, y0])
                mx, my = (delta * right).sum(-1) + centre, -(delta * forward).sum(-1) + centre
                inside = (mx >= 0) & (mx < map_size) & (my >= 0) & (my < map_size)
                index.append(torch.where(inside, my * map_size + mx, torch.full_like(mx, map_size * map_size)))
                origins.append((x0, y0, direction))
    return torch.tensor(origins, dtype=torch.long), torch.stack(index)


def structure_of(contents: torch.Tensor) -> torch.Tensor:
    """contents (..., 3) (object, colour, state) -> (...) what the agent cannot change, as
    :func:`worldmodel.metrics.structure`: 0 floor or a movable object, 1 wall, 2 door, 3 goal, 4 lava."""
    kind = contents[..., 0]
    out = torch.zeros_like(kind)
    for value, obj in ((1, WALL), (2, DOOR), (3, GOAL), (4, LAVA)):
        out = torch.where(kind == obj, torch.full_like(kind, value), out)
    return out


def place(structure: torch.Tensor, index: torch.Tensor, layouts: torch.Tensor, kept: torch.Tensor | None = None,
          budget: int = 1 << 23) -> tuple[torch.Tensor, torch.Tensor]:
    """structure (B, M * M + 1) of every map cell (-1: unknown), index (P, W * H) (:func:`placements`),
    layouts (L, W * H) (:func:`structure_of` classes), kept (B,): a placement found before (-1: none)
    -> (placement (B,), agreed (B, W * H)). The placement is the kept one, else the one placement
    that puts every known map cell on its structure in some layout (-1 where none or several do);
    ``agreed`` is the structure of every world cell that all the layouts fitting there agree on
    (-1 where they differ, none fits or there is no placement). Rows are matched ``budget`` cell
    comparisons at a time.

    A placement, once found, is kept: a real map only narrows the fits, and an imagined one that
    drew a cell wrong should not move the world under the agent."""
    placement, agreed = [], []
    kept = torch.full(structure.shape[:1], -1, dtype=torch.long, device=structure.device) if kept is None else kept
    chunk = max(1, budget // max(1, index.numel() * len(layouts)))
    for rows, before in zip(structure.split(chunk), kept.split(chunk)):
        seen = rows[:, index][:, :, None]  # (b, P, 1, W * H)
        inside = (seen[:, :, 0] >= 0).sum(-1) == (rows >= 0).sum(-1)[:, None]  # (b, P): no known cell off the world
        fits = ~((seen >= 0) & (seen != layouts[None, None])).any(-1) & inside[..., None]  # (b, P, L)
        anywhere = fits.any(-1)  # (b, P)
        first = anywhere.to(torch.int8).argmax(-1)
        found = torch.where(anywhere.sum(-1) == 1, first, torch.full_like(first, -1))
        chosen = torch.where(before >= 0, before, found)
        at = fits[torch.arange(len(rows), device=rows.device), chosen.clamp_min(0)][..., None]  # (b, L, 1)
        low = torch.where(at, layouts[None], 5).amin(1)  # (b, W * H)
        high = torch.where(at, layouts[None], -1).amax(1)
        placement.append(chosen)
        agreed.append(torch.where((low == high) & (chosen >= 0)[:, None], low, torch.full_like(low, -1)))
    return torch.cat(placement), torch.cat(agreed)


def world_cells(index: torch.Tensor, map_size: int) -> torch.Tensor:
    """index (P, W * H) (:func:`placements`) -> (P, M * M + 1): the world cell each map cell is under
    each placement (-1 outside the world, and at the trash cell)."""
    out = torch.full((index.shape[0], map_size * map_size + 1), -1, dtype=torch.long)
    cells = torch.arange(index.shape[1]).expand_as(index)
    out.scatter_(1, index, cells)
    out[:, -1] = -1
    return out


def world_pose(origin: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """origin (B, 3) (x0, y0, MiniGrid direction of the first frame), pose (B, 3) in the map frame ->
    the agent's absolute (x, y, direction) (B, 3): :func:`relative_poses` inverted."""
    vectors = torch.tensor(WORLD_VECTORS, device=pose.device)
    forward = vectors[origin[:, 2] % 4]
    right = torch.stack([-forward[:, 1], forward[:, 0]], dim=-1)
    xy = origin[:, :2] + right * pose[:, :1] - forward * pose[:, 1:2]
    return torch.cat([xy, ((origin[:, 2] + pose[:, 2]) % 4)[:, None]], dim=-1)
