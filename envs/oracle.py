"""BFS oracle: the optimal action from any symbolic state, counting turns as steps.

It plans on the decoded symbolic state (not on env internals), so it can act from a dataset state
or from a world model's state estimate just as well as from the real env. Supported: navigation
tasks whose mission is to reach a goal tile, with walls, lava (never entered), keys, closed and
locked doors and multiple rooms (Empty, DoorKey, FourRooms, LavaGap, LavaCrossing, SimpleCrossing,
MultiRoom, ...). Dropping objects is never needed for these tasks and is not planned. Other objects
(balls, boxes) are obstacles.

MiniGrid's reward ``1 - 0.9 * steps / max_steps`` falls with every step, so the shortest plan is
the highest-return plan: the oracle's return is the upper bound every report uses.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from minigrid.core.actions import Actions

from envs.state import DOOR, DOOR_CLOSED, DOOR_LOCKED, DOOR_OPEN, EMPTY, GOAL, KEY, LAVA, StateCodec, SymbolicState

LEFT, RIGHT, FORWARD, PICKUP, TOGGLE = (
    int(Actions.left), int(Actions.right), int(Actions.forward), int(Actions.pickup), int(Actions.toggle),
)
# Order in which BFS expands actions: fixes the tie-break between equally short plans.
_ACTION_ORDER = (FORWARD, LEFT, RIGHT, PICKUP, TOGGLE)
_DIR_TO_VEC = ((1, 0), (0, 1), (-1, 0), (0, -1))
_PASSABLE = {EMPTY, GOAL, 3}  # empty, goal, floor (3); open doors are handled apart
NO_CARRY = -1
CARRY_OTHER = -2  # carrying something that is not a key (cannot open doors)

# A search node: (x, y, direction, carried key colour or NO_CARRY/CARRY_OTHER,
#                 door states tuple, keys-still-on-the-floor bitmask)
Node = tuple


class OracleError(ValueError):
    """The oracle cannot plan for this state (no goal tile: unsupported mission)."""


@dataclass(frozen=True)
class _Layout:
    """The static part of a state: what never changes while the agent plays."""

    width: int
    height: int
    static: np.ndarray  # (W, H) object index with doors/keys/agent removed
    goals: frozenset
    door_index: dict  # (x, y) -> door i
    door_colors: tuple
    key_index: dict  # (x, y) -> key i
    key_colors: tuple


def _layout_and_node(state: SymbolicState) -> tuple[_Layout, Node]:
    grid = state.grid
    static = grid[:, :, 0].astype(np.int64).copy()
    doors = state.objects(DOOR)
    keys = state.objects(KEY)
    for x, y, _, _ in doors + keys:
        static[x, y] = EMPTY
    goals = frozenset(state.goal_positions)
    if not goals:
        raise OracleError("the oracle plans to a goal tile, and this state has none (unsupported mission)")
    layout = _Layout(
        width=state.width,
        height=state.height,
        static=static,
        goals=goals,
        door_index={(x, y): i for i, (x, y, _, _) in enumerate(doors)},
        door_colors=tuple(c for _, _, c, _ in doors),
        key_index={(x, y): i for i, (x, y, _, _) in enumerate(keys)},
        key_colors=tuple(c for _, _, c, _ in keys),
    )
    kind, color, _ = state.carrying
    carry = NO_CARRY if kind == EMPTY else (color if kind == KEY else CARRY_OTHER)
    node = (
        int(state.agent_pos[0]), int(state.agent_pos[1]), int(state.agent_dir), carry,
        tuple(s for _, _, _, s in doors), (1 << len(keys)) - 1,
    )
    return layout, node


def _step(layout: _Layout, node: Node, action: int) -> tuple[Node | None, bool]:
    """Successor of ``node`` under ``action``: (next node or None if the agent dies, reached goal)."""
    x, y, d, carry, door_states, keys_present = node
    if action == LEFT:
        return (x, y, (d - 1) % 4, carry, door_states, keys_present), False
    if action == RIGHT:
        return (x, y, (d + 1) % 4, carry, door_states, keys_present), False
    dx, dy = _DIR_TO_VEC[d]
    fx, fy = x + dx, y + dy
    if not (0 <= fx < layout.width and 0 <= fy < layout.height):
        return node, False
    door = layout.door_index.get((fx, fy))
    key = layout.key_index.get((fx, fy))
    key_here = key is not None and keys_present >> key & 1
    if action == FORWARD:
        if door is not None:
            if door_states[door] == DOOR_OPEN:
                return (fx, fy, d, carry, door_states, keys_present), False
            return node, False
        if key_here:
            return node, False
        kind = layout.static[fx, fy]
        if kind == LAVA:
            return None, False
        if kind in _PASSABLE:
            return (fx, fy, d, carry, door_states, keys_present), (fx, fy) in layout.goals
        return node, False
    if action == PICKUP:
        if key_here and carry == NO_CARRY:
            return (x, y, d, layout.key_colors[key], door_states, keys_present & ~(1 << key)), False
        return node, False
    if action == TOGGLE and door is not None:
        states = list(door_states)
        current = states[door]
        if current == DOOR_LOCKED:
            if carry == layout.door_colors[door]:
                states[door] = DOOR_OPEN
        else:
            states[door] = DOOR_CLOSED if current == DOOR_OPEN else DOOR_OPEN
        return (x, y, d, carry, tuple(states), keys_present), False
    return node, False


def plan(state: SymbolicState) -> list[int] | None:
    """The shortest action sequence from ``state`` to a goal tile, or None if none exists."""
    layout, start = _layout_and_node(state)
    parents: dict[Node, tuple[Node, int] | None] = {start: None}
    frontier = deque([start])
    while frontier:
        node = frontier.popleft()
        for action in _ACTION_ORDER:
            child, success = _step(layout, node, action)
            if child is None:
                continue
            if success:
                actions = [action]
                while parents[node] is not None:
                    node, previous = parents[node]  # type: ignore[misc]
                    actions.append(previous)
                return actions[::-1]
            if child not in parents:
                parents[child] = (node, action)
                frontier.append(child)
    return None


class Oracle:
    """Optimal actions for one grid size; remembers its last plan so following it costs no search.

    ``action(state_array)`` returns the first action of a shortest plan (``FORWARD`` is preferred
    among ties, then left, right, pickup, toggle). If the state is unsolvable it returns None.
    """

    def __init__(self, codec: StateCodec):
        self.codec = codec
        self._expected: Node | None = None
        self._remaining: list[int] = []

    def plan(self, state_array: np.ndarray) -> list[int] | None:
        return plan(self.codec.decode(state_array))

    def action(self, state_array: np.ndarray) -> int | None:
        state = self.codec.decode(state_array)
        layout, node = _layout_and_node(state)
        if self._remaining and node == self._expected:
            actions = self._remaining
        else:
            actions = plan(state)  # off the remembered plan (first call, a random action, a reset)
            if not actions:
                self._expected, self._remaining = None, []
                return None
        first = actions[0]
        self._expected, _ = _step(layout, node, first)
        self._remaining = actions[1:]
        return first

    def reset(self) -> None:
        self._expected, self._remaining = None, []
