"""What a world model of the egocentric view can be judged on: the cells and state fields that the
observations so far *determine*, and metrics over them (1 step, open loop, object permanence).

Everything is computed from the dataset's symbolic states (the truth), never from the model.

**Determined cells.** Frame t+1 of a segment, given the frames the model read for real (``observed``:
all frames <= t teacher-forced, or only the context frames of an open-loop rollout) and the true
actions. Let K be the world cells (and out-of-grid cells, which the view draws as walls) that some
read frame showed visible, the agent's relative pose be known while every "forward" so far had its
front cell in K (otherwise whether it moved is unknown and, from then on, nothing is determined), and
the carried object be known once a frame was read and while no pickup/drop/toggle acted on a cell
outside K (such an action also removes that front cell from K). A cell of the next view is
*determined* when
  - its visibility is: MiniGrid's occlusion (``Grid.process_vis``) gives the same answer with every
    cell outside K see-through and with every one opaque (visibility only falls as cells become
    opaque, so then it is the same for any content of the unknown cells), and
  - it is hidden (drawn black), or its world cell is in K, or it is the agent's own cell (drawn with
    what it carries) while the carried object is known.
Out-of-view changes (none in DoorKey: objects move only through the agent) are not modelled.
For the full view every cell is determined.

**Returning cells** (object permanence): determined, visible cells of frame t+1 that were hidden or
out of view in frame t, whose world cell a read frame showed before, with the same content now as
then (static), and not the agent's cell.

**Determined state fields** of frame t (frames <= t read): the carried object's three fields when
it is known; and, when the cells seen so far fix the agent's absolute placement, the agent's
position and direction and the three fields of every seen cell and of the outer ring. The placement
is fixed when exactly one (direction, interior position) of the agent puts every seen cell's
*structure* (floor or movable object / wall / door / goal / lava: what the agent cannot change; out
of the grid: wall) onto the same structure in at least one of the env's layouts (:func:`layouts_of`:
the distinct structures of the dataset's episode starts, i.e. what the generator draws). Otherwise
only the carried object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from envs.state import DOOR, DOOR_OPEN, GOAL, LAVA, WALL, StateCodec

DIRECTIONS = np.array([(1, 0), (0, 1), (-1, 0), (0, -1)])  # MiniGrid: east, south, west, north
FORWARD, PICKUP, DROP, TOGGLE = 2, 3, 4, 5
WALL_CONTENT = (WALL, 5, 0)  # an out-of-grid cell, as the view draws it (a grey wall)


def view_world_coords(agent_pos, agent_dir: int, view: int) -> np.ndarray:
    """(view, view, 2) world (x, y) of every cell of the egocentric view, indexed [row, column]
    as the frame draws it (agent at the bottom centre facing up); MiniGrid's ``get_view_coords``
    inverted."""
    forward = DIRECTIONS[agent_dir]
    right = np.array([-forward[1], forward[0]])
    rows, cols = np.meshgrid(np.arange(view), np.arange(view), indexing="ij")
    return (np.asarray(agent_pos)[None, None] + forward * (view - 1 - rows)[..., None]
            + right * (cols - view // 2)[..., None])


def visibility(opaque: np.ndarray) -> np.ndarray:
    """opaque (view, view) bool [row, column] -> visible (view, view) bool: ``Grid.process_vis``
    from the agent at the bottom centre (a cell is seen when light reaches it through see-through
    cells, row by row away from the agent)."""
    h, w = opaque.shape
    mask = np.zeros((w, h), dtype=bool)  # [column, row] as MiniGrid indexes it
    block = opaque.T
    mask[w // 2, h - 1] = True
    for j in reversed(range(h)):
        for i in range(w - 1):
            if mask[i, j] and not block[i, j]:
                mask[i + 1, j] = True
                if j > 0:
                    mask[i + 1, j - 1] = mask[i, j - 1] = True
        for i in reversed(range(1, w)):
            if mask[i, j] and not block[i, j]:
                mask[i - 1, j] = True
                if j > 0:
                    mask[i - 1, j - 1] = mask[i, j - 1] = True
    return mask.T


def _is_opaque(content: np.ndarray) -> np.ndarray:
    """(..., 3) object, colour, state -> (...) bool: walls and doors not open hide what lies behind."""
    return (content[..., 0] == WALL) | ((content[..., 0] == DOOR) & (content[..., 2] != DOOR_OPEN))


def _view_contents(grid: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """grid (W, H, 3), coords (v, v, 2) -> contents (v, v, 3), walls outside the grid."""
    width, height = grid.shape[:2]
    x, y = coords[..., 0], coords[..., 1]
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    out = np.empty(coords.shape[:2] + (3,), dtype=np.int64)
    out[:] = WALL_CONTENT
    out[inside] = grid[x[inside], y[inside]]
    return out


@dataclass
class Determined:
    """What a segment's observations determine (see the module docstring). T frames."""

    cells: np.ndarray  # (T, v, v) bool: frame t's determined cells (frame 0: all False, never predicted)
    returning: np.ndarray  # (T, v, v) bool: determined cells coming back into view, static since seen
    state_fields: np.ndarray  # (T, S) bool: frame t's state fields determined by read frames <= t
    visible: np.ndarray  # (T, v, v) bool: the true visibility of every frame


def determined(states: np.ndarray, actions: np.ndarray, observed: np.ndarray, codec: StateCodec,
               layouts: np.ndarray | None = None, view: int = 7) -> Determined:
    """states (T, S) of consecutive frames of one episode, actions (T - 1,) (actions[t]: t -> t+1),
    observed (T,) bool (the frames the model read for real), layouts (L, W, H) (:func:`layouts_of`;
    None: no state field but the carried object is determined) -> :class:`Determined`."""
    num = len(states)
    cells = np.zeros((num, view, view), dtype=bool)
    returning = np.zeros_like(cells)
    visible_all = np.zeros_like(cells)
    fields = np.zeros((num, codec.size), dtype=bool)
    known: dict[tuple[int, int], tuple[int, ...]] = {}  # world cell -> content when last read or determined
    carry_known, pose_known = False, True
    agent_row, agent_col = view - 1, view // 2
    previous_visible_world: set[tuple[int, int]] = set()
    for t in range(num):
        state = codec.decode(states[t])
        grid = state.grid.astype(np.int64)
        coords = view_world_coords(state.agent_pos, state.agent_dir, view)
        contents = _view_contents(grid, coords)
        opaque = _is_opaque(contents)
        visible = visibility(opaque)
        visible_all[t] = visible
        world = [tuple(int(v) for v in coords[r, c]) for r in range(view) for c in range(view)]
        if t > 0 and pose_known:
            before = codec.decode(states[t - 1])
            front = tuple(int(v) for v in np.asarray(before.agent_pos) + DIRECTIONS[before.agent_dir])
            action = int(actions[t - 1])
            if action == FORWARD and front not in known:
                pose_known = False
            elif action in (PICKUP, DROP, TOGGLE) and front not in known:
                carry_known = False
        if t > 0 and pose_known:
            in_k = np.array([cell in known for cell in world]).reshape(view, view)
            in_k[agent_row, agent_col] = True  # the agent stands on a see-through cell
            most = visibility(opaque & in_k)
            least = visibility(opaque | ~in_k)
            det = (most == least) & (~visible | in_k)
            det[agent_row, agent_col] = carry_known
            cells[t] = det
            for index, cell in enumerate(world):
                r, c = divmod(index, view)
                if (det[r, c] and visible[r, c] and (r, c) != (agent_row, agent_col) and cell in known
                        and cell not in previous_visible_world
                        and tuple(known[cell]) == tuple(int(v) for v in contents[r, c])):
                    returning[t, r, c] = True
            for cell in list(known):  # effects of the action on known cells are determined: follow them
                x, y = cell
                if 0 <= x < grid.shape[0] and 0 <= y < grid.shape[1]:
                    known[cell] = tuple(int(v) for v in grid[x, y])
        if observed[t]:
            carry_known = True
            for index, cell in enumerate(world):
                r, c = divmod(index, view)
                if visible[r, c] and (r, c) != (agent_row, agent_col):
                    known[cell] = tuple(int(v) for v in contents[r, c])
        previous_visible_world = {cell for index, cell in enumerate(world) if visible[divmod(index, view)]}
        fields[t] = _determined_fields(known, state, codec, carry_known and pose_known,
                                       layouts if pose_known else None)
    return Determined(cells=cells, returning=returning, state_fields=fields, visible=visible_all)


def structure(grid: np.ndarray) -> np.ndarray:
    """grid (..., 3) -> (...) int: what the agent cannot change — 0 floor or a movable object, 1 wall,
    2 door (open or not), 3 goal, 4 lava. Out-of-grid cells are walls."""
    kind = grid[..., 0]
    return np.select([kind == WALL, kind == DOOR, kind == GOAL, kind == LAVA], [1, 2, 3, 4], 0)


def layouts_of(first_states: np.ndarray, codec: StateCodec) -> np.ndarray:
    """(E, S) states -> (L, W, H) int: the distinct structures (:func:`structure`) of their grids,
    the layouts the env's generator draws (a dataset's episode starts show them)."""
    grids = np.stack([structure(codec.decode(s).grid.astype(np.int64)) for s in first_states])
    return np.unique(grids, axis=0)


def tile_contents_of(tokens: np.ndarray, states: np.ndarray, codec: StateCodec, vocab_size: int,
                     max_frames: int = 4096, agreement: float = 0.99) -> np.ndarray:
    """tokens (F, v, v) of egocentric frames, states (F, S) -> (V, 3) int: the cell content (object,
    colour, state) each token draws, the most frequent over the visible view cells but the agent's
    own (at least ``agreement`` of them); -1 for a token never seen there or drawing several."""
    view = tokens.shape[-1]
    counts: dict[int, dict[tuple[int, ...], int]] = {}
    for f in np.linspace(0, len(tokens) - 1, min(len(tokens), max_frames)).astype(int):
        state = codec.decode(states[f])
        contents = _view_contents(state.grid.astype(np.int64), view_world_coords(state.agent_pos, state.agent_dir, view))
        visible = visibility(_is_opaque(contents))
        visible[view - 1, view // 2] = False
        for token, content in zip(tokens[f][visible].tolist(), contents[visible].tolist()):
            seen = counts.setdefault(int(token), {})
            seen[tuple(content)] = seen.get(tuple(content), 0) + 1
    table = np.full((vocab_size, 3), -1, dtype=np.int64)
    for token, seen in counts.items():
        content, count = max(seen.items(), key=lambda item: item[1])
        if count >= agreement * sum(seen.values()):
            table[token] = content
    return table


def structure_contents_of(states: np.ndarray, codec: StateCodec) -> np.ndarray:
    """states (F, S) -> (5, 3) int: the one content of each :func:`structure` class in these grids
    (a wall is a grey wall, the goal green), -1 where it varies (floor, doors) or never occurs."""
    grids = np.stack([codec.decode(s).grid.astype(np.int64) for s in states]).reshape(-1, 3)
    kinds = structure(grids)
    table = np.full((5, 3), -1, dtype=np.int64)
    for kind in range(5):
        contents = np.unique(grids[kinds == kind], axis=0)
        if len(contents) == 1:
            table[kind] = contents[0]
    return table


def _determined_fields(known: dict, state, codec: StateCodec, carry_known: bool, layouts: np.ndarray | None) -> np.ndarray:
    """(S,) bool: the state fields of one frame that the read frames determine (module docstring)."""
    out = np.zeros(codec.size, dtype=bool)
    if carry_known:
        out[codec.grid_size + 3:] = True
    if layouts is None or not known:
        return out
    width, height = codec.width, codec.height
    cells = np.array(list(known.keys()))  # (K, 2)
    seen = structure(np.array([content for content in known.values()], dtype=np.int64))  # (K,)
    anchor = np.asarray(state.agent_pos)
    offsets = cells - anchor
    xs, ys = np.meshgrid(np.arange(1, width - 1), np.arange(1, height - 1), indexing="ij")
    positions = np.stack([xs.ravel(), ys.ravel()], axis=1)  # (C, 2) where the agent could stand
    padded = np.pad(layouts, ((0, 0), (1, 1), (1, 1)), constant_values=1)  # out of grid: wall
    poses = set()
    for turn in range(4):  # the seen cells turned by `turn` quarter turns about the agent, moved anywhere
        rotated = offsets.copy()
        for _ in range(turn):
            rotated = np.stack([-rotated[:, 1], rotated[:, 0]], axis=1)
        moved = positions[:, None] + rotated[None]  # (C, K, 2)
        x = np.clip(moved[..., 0] + 1, 0, width + 1)
        y = np.clip(moved[..., 1] + 1, 0, height + 1)
        far = (moved[..., 0] < -1) | (moved[..., 0] > width) | (moved[..., 1] < -1) | (moved[..., 1] > height)
        found = np.where(far[None], 1, padded[:, x, y])  # (L, C, K)
        ok = (found == seen).all(axis=-1)  # (L, C)
        for c in np.nonzero(ok.any(axis=0))[0]:
            poses.add((turn, int(c)))
        if len(poses) > 1:
            return out
    if len(poses) != 1:
        return out
    out[codec.grid_size:codec.grid_size + 3] = True
    for x, y in known:
        if 0 <= x < width and 0 <= y < height:
            out[(x * height + y) * 3:(x * height + y) * 3 + 3] = True
    for x in range(width):
        for y in range(height):
            if x in (0, width - 1) or y in (0, height - 1):
                out[(x * height + y) * 3:(x * height + y) * 3 + 3] = True
    return out


# ---------------------------------------------------------------------------------------------
# Metrics of a model over a dataset
# ---------------------------------------------------------------------------------------------


def _segment_truth(states, actions, observed, codec, layouts, full: bool, view: int) -> Determined:
    if not full:
        return determined(states, actions, observed, codec, layouts, view=view)
    num = len(states)
    cells = np.ones((num, codec.height, codec.width), dtype=bool)
    cells[0] = False
    return Determined(cells=cells, returning=np.zeros_like(cells), state_fields=np.ones((num, codec.size), bool),
                      visible=np.ones_like(cells))


def _rate(values: list) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def one_step_metrics(model, dataset, codec: StateCodec, layouts: np.ndarray | None = None, window: int = 64,
                     max_windows: int = 0, batch_size: int = 16, seed: int = 0) -> dict[str, float]:
    """Teacher-forced metrics over episode segments of ``window`` frames (each read from its start:
    the model's memory starts there, and so do the observations that determine cells).

    -> ``frame_exact_1step`` (all cells), ``frame_exact_1step_determined`` (the determined cells of
    the next frame all right), ``permanence_1step`` (returning cells right, see module docstring),
    ``state_head_accuracy_determined`` (the determined fields of a frame's state all right),
    ``determined_cell_fraction``, counts. ``max_windows`` > 0: that many segments drawn at random."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    full = model.config.full_view
    episodes, starts = [], []
    for e, length in enumerate(dataset.episode_lengths):
        for s in range(0, int(length), window - 1):
            episodes.append(e)
            starts.append(s)
    order = np.arange(len(episodes))
    if max_windows > 0 and len(order) > max_windows:
        order = np.sort(np.random.default_rng(seed).permutation(len(order))[:max_windows])
    episodes_a, starts_a = np.asarray(episodes)[order], np.asarray(starts)[order]
    exact, exact_det, returning, state_ok, det_fraction = [], [], [], [], []
    for i in range(0, len(episodes_a), batch_size):
        windows = dataset.windows_at(episodes_a[i:i + batch_size], starts_a[i:i + batch_size], window)
        tokens = torch.as_tensor(windows.extras["tokens"], device=device).long()
        actions = torch.as_tensor(windows.actions, device=device).long()
        with torch.no_grad():
            out = model(tokens, actions)
            predicted = model.tokens_from_logits(out.token_logits).cpu().numpy()  # (B, T, N)
            states_predicted = out.state_logits.argmax(-1).cpu().numpy()  # (B, T, S)
        real = windows.extras["tokens"].reshape(*predicted.shape)
        for b in range(len(predicted)):
            length = int(windows.mask[b].sum())
            truth = _segment_truth(windows.states[b, :length], windows.actions[b, :length - 1],
                                   np.ones(length, bool), codec, layouts, full, model.config.grid_height)
            for t in range(1, length):
                if windows.actions[b, t - 1] < 0:
                    break
                right = predicted[b, t - 1] == real[b, t]
                cells = truth.cells[t].reshape(-1)
                exact.append(bool(right.all()))
                exact_det.append(bool(right[cells].all()))
                det_fraction.append(float(cells.mean()))
                returning.extend(right[truth.returning[t].reshape(-1)].tolist())
            for t in range(length):
                fields = truth.state_fields[t]
                state_ok.append(bool((states_predicted[b, t] == windows.states[b, t])[fields].all()))
    return {
        "frame_exact_1step": _rate(exact), "frame_exact_1step_determined": _rate(exact_det),
        "permanence_1step": _rate(returning), "permanence_1step_cells": len(returning),
        "state_head_accuracy_determined": _rate(state_ok), "determined_cell_fraction": _rate(det_fraction),
        "transitions": len(exact),
    }


def open_loop_metrics(world_model, dataset, codec: StateCodec, layouts: np.ndarray | None = None, context: int = 8,
                      horizon: int = 32, num_rollouts: int = 128, seed: int = 0,
                      ks: tuple[int, ...] = (1, 4, 8, 16, 32)) -> dict:
    """Open-loop rollouts with the true actions after ``context`` real frames.

    -> ``open_loop_consistent`` {k: the fraction of rollouts whose determined cells (by the context
    frames alone) are right at every step up to k}, ``permanence`` (over the rollouts' steps that
    bring an already-seen static cell back into view, the fraction of such cells predicted right),
    ``permanence_cells``, ``determined_cells_per_step`` {k: mean determined cells at step k}."""
    from worldmodel.train_dynamics import open_loop

    full = world_model.config.full_view
    horizon = min(horizon, int(dataset.episode_lengths.max()) + 1 - context)
    rollout = open_loop(world_model, dataset, horizon, num_rollouts, seed=seed, context=context,
                        with_windows=True)
    windows = rollout["windows"]
    consistent = np.zeros((len(rollout["exact"]), horizon), dtype=bool)
    counts = np.zeros((len(rollout["exact"]), horizon))
    returning: list[bool] = []
    observed = np.arange(context + horizon) < context
    for r in range(len(consistent)):
        truth = _segment_truth(windows.states[r], windows.actions[r, :context + horizon - 1], observed, codec,
                               layouts, full, world_model.token_shape[0])
        ok = True
        for k in range(horizon):
            frame = context + k
            right = rollout["imagined"][r, k] == rollout["real"][r, k]
            ok = ok and bool(right[truth.cells[frame]].all())
            consistent[r, k] = ok
            counts[r, k] = truth.cells[frame].sum()
            returning.extend(right[truth.returning[frame]].tolist())
    return {
        "open_loop_consistent": {k: float(consistent[:, k - 1].mean()) for k in ks if k <= horizon},
        "determined_cells_per_step": {k: float(counts[:, k - 1].mean()) for k in ks if k <= horizon},
        "permanence": _rate(returning), "permanence_cells": len(returning), "rollouts": len(consistent),
        "context": context,
    }
