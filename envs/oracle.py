"""BFS oracle: the optimal action from any symbolic state, counting turns as steps.

It plans on the decoded symbolic state (not on env internals), so it can act from a dataset state
or from a world model's state estimate just as well as from the real env. What it plans for is a
:class:`Task`, which the state alone does not say (:func:`task_for_env` reads it off the env):

- ``goal`` (the default): reach a goal tile, with walls, lava (never entered), keys, closed and
  locked doors and multiple rooms (Empty, DoorKey, FourRooms, LavaGap, LavaCrossing,
  SimpleCrossing, MultiRoom, ...). Dropping objects is never needed for these tasks and is not
  planned. Other objects (balls, boxes) are obstacles.
- ``pickup``: pick up an object of a given type (and colour), reward on the pickup (KeyCorridor).
  Hands must be empty to pick it up, so here the search may drop a carried key on an empty cell.
- ``moving_obstacles`` (Dynamic-Obstacles): the balls move at random every step and walking into
  one (or a wall) ends the episode with -1. The oracle re-plans every step around the balls where
  they are: see :class:`Oracle`.

MiniGrid's reward ``1 - 0.9 * steps / max_steps`` falls with every step, so on static tasks the
shortest plan is the highest-return plan: the oracle's return is the upper bound every report
uses. With moving obstacles it is a strong reference, not an upper bound.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from minigrid.core.actions import Actions
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX

from envs.state import DOOR, DOOR_CLOSED, DOOR_LOCKED, DOOR_OPEN, EMPTY, GOAL, KEY, LAVA, StateCodec, SymbolicState

LEFT, RIGHT, FORWARD, PICKUP, DROP, TOGGLE = (
    int(Actions.left), int(Actions.right), int(Actions.forward), int(Actions.pickup), int(Actions.drop),
    int(Actions.toggle),
)
BALL = OBJECT_TO_IDX["ball"]
# Order in which BFS expands actions: fixes the tie-break between equally short plans. DROP comes
# last and is only expanded on pickup tasks, so goal tasks keep the plans they always had.
_ACTION_ORDER = (FORWARD, LEFT, RIGHT, PICKUP, TOGGLE)
_ACTION_ORDER_WITH_DROP = _ACTION_ORDER + (DROP,)
_DIR_TO_VEC = ((1, 0), (0, 1), (-1, 0), (0, -1))
_PASSABLE = {EMPTY, GOAL, 3}  # empty, goal, floor (3); open doors are handled apart
NO_CARRY = -1
CARRY_OTHER = -2  # carrying something that is not a key (cannot open doors, is never dropped)

# A search node: (x, y, direction, index of the carried key or NO_CARRY/CARRY_OTHER,
#                 door states tuple, key positions tuple: (x, y), or None while carried)
Node = tuple


class OracleError(ValueError):
    """The oracle cannot plan for this state (no goal tile or no target: unsupported mission)."""


@dataclass(frozen=True)
class Task:
    """What the oracle plans for (the symbolic state does not say: MiniGrid keeps it in the mission)."""

    kind: str = "goal"
    """goal: reach a goal tile; pickup: pick up an object of target_type (and target_color)"""
    target_type: int = BALL
    """pickup: the object index (minigrid OBJECT_TO_IDX) of the object to pick up"""
    target_color: int | None = None
    """pickup: its colour index, or None for any object of target_type (the nearest one)"""
    moving_obstacles: bool = False
    """the balls move at random every step (Dynamic-Obstacles): re-plan every step around them"""

    def __post_init__(self):
        if self.kind not in ("goal", "pickup"):
            raise ValueError(f"unknown oracle task kind '{self.kind}': choose goal or pickup")


GOAL_TASK = Task()


def task_for_env(env, exact: bool = False) -> Task:
    """The oracle's task for a (possibly wrapped) MiniGrid env.

    KeyCorridor: pick up its ball (``exact``: of the colour this episode's mission names, read off
    ``env.unwrapped.obj``; otherwise any ball, which is exact while the grid holds one ball, as in
    every KeyCorridor layout, and stays right across episodes of other colours). Dynamic-Obstacles:
    reach the goal around moving balls. Anything else: reach the goal tile.
    """
    from minigrid.envs import DynamicObstaclesEnv, KeyCorridorEnv

    base = env.unwrapped
    if isinstance(base, DynamicObstaclesEnv):
        return Task(moving_obstacles=True)
    if isinstance(base, KeyCorridorEnv):
        target = getattr(base, "obj", None)
        if exact and target is not None:
            return Task("pickup", OBJECT_TO_IDX[target.type], COLOR_TO_IDX[target.color])
        return Task("pickup", OBJECT_TO_IDX[getattr(base, "obj_type", "ball")])
    return GOAL_TASK


def task_for_env_id(env_id: str) -> Task:
    """:func:`task_for_env` (not exact) from an env id: what a behaviour policy is built with."""
    from envs.make import make_env

    env = make_env(env_id)
    try:
        return task_for_env(env)
    finally:
        env.close()


@dataclass(frozen=True)
class _Layout:
    """The static part of a state: what never changes while the agent plays."""

    width: int
    height: int
    static: np.ndarray  # (W, H) object index with doors/keys/agent removed
    goals: frozenset  # goal task: the goal tiles
    targets: frozenset  # pickup task: the cells of the objects to pick up
    door_index: dict  # (x, y) -> door i
    door_colors: tuple
    key_colors: tuple
    allow_drop: bool


def _layout_and_node(state: SymbolicState, task: Task = GOAL_TASK, ignore_balls: bool = False) -> tuple[_Layout, Node]:
    grid = state.grid
    static = grid[:, :, 0].astype(np.int64).copy()
    doors = state.objects(DOOR)
    keys = state.objects(KEY)
    for x, y, _, _ in doors + keys:
        static[x, y] = EMPTY
    if ignore_balls:
        static[static == BALL] = EMPTY
    goals = frozenset(state.goal_positions) if task.kind == "goal" else frozenset()
    targets = frozenset()
    if task.kind == "goal" and not goals:
        raise OracleError("the oracle plans to a goal tile, and this state has none (unsupported mission)")
    if task.kind == "pickup":
        targets = frozenset((x, y) for x, y, color, _ in state.objects(task.target_type)
                            if task.target_color is None or color == task.target_color)
        if task.target_type == KEY or not targets:
            raise OracleError("the oracle's pickup task has no target object (other than a key) in this state")
    kind, color, _ = state.carrying
    key_positions = [(x, y) for x, y, _, _ in keys]
    key_colors = [c for _, _, c, _ in keys]
    carry = NO_CARRY
    if kind == KEY:  # a carried key is one more key, at no position
        carry = len(key_positions)
        key_positions.append(None)
        key_colors.append(color)
    elif kind != EMPTY:
        carry = CARRY_OTHER
    layout = _Layout(
        width=state.width,
        height=state.height,
        static=static,
        goals=goals,
        targets=targets,
        door_index={(x, y): i for i, (x, y, _, _) in enumerate(doors)},
        door_colors=tuple(c for _, _, c, _ in doors),
        key_colors=tuple(key_colors),
        allow_drop=task.kind == "pickup",
    )
    node = (
        int(state.agent_pos[0]), int(state.agent_pos[1]), int(state.agent_dir), carry,
        tuple(s for _, _, _, s in doors), tuple(key_positions),
    )
    return layout, node


def _step(layout: _Layout, node: Node, action: int) -> tuple[Node | None, bool]:
    """Successor of ``node`` under ``action``: (next node or None if the agent dies, task done)."""
    x, y, d, carry, door_states, key_positions = node
    if action == LEFT:
        return (x, y, (d - 1) % 4, carry, door_states, key_positions), False
    if action == RIGHT:
        return (x, y, (d + 1) % 4, carry, door_states, key_positions), False
    dx, dy = _DIR_TO_VEC[d]
    fx, fy = x + dx, y + dy
    if not (0 <= fx < layout.width and 0 <= fy < layout.height):
        return node, False
    door = layout.door_index.get((fx, fy))
    key = key_positions.index((fx, fy)) if (fx, fy) in key_positions else None
    if action == FORWARD:
        if door is not None:
            if door_states[door] == DOOR_OPEN:
                return (fx, fy, d, carry, door_states, key_positions), False
            return node, False
        if key is not None:
            return node, False
        kind = layout.static[fx, fy]
        if kind == LAVA:
            return None, False
        if kind in _PASSABLE:
            return (fx, fy, d, carry, door_states, key_positions), (fx, fy) in layout.goals
        return node, False
    if action == PICKUP:
        if carry != NO_CARRY:
            return node, False
        if key is not None:
            positions = key_positions[:key] + (None,) + key_positions[key + 1:]
            return (x, y, d, key, door_states, positions), False
        return node, (fx, fy) in layout.targets
    if action == DROP:
        # MiniGrid drops only onto an empty cell; a non-key object in hand is never dropped.
        if carry < 0 or door is not None or key is not None or layout.static[fx, fy] != EMPTY:
            return node, False
        positions = key_positions[:carry] + ((fx, fy),) + key_positions[carry + 1:]
        return (x, y, d, NO_CARRY, door_states, positions), False
    if action == TOGGLE and door is not None:
        states = list(door_states)
        current = states[door]
        if current == DOOR_LOCKED:
            if carry >= 0 and layout.key_colors[carry] == layout.door_colors[door]:
                states[door] = DOOR_OPEN
        else:
            states[door] = DOOR_CLOSED if current == DOOR_OPEN else DOOR_OPEN
        return (x, y, d, carry, tuple(states), key_positions), False
    return node, False


def _search(layout: _Layout, start: Node) -> list[int] | None:
    """Breadth-first search from ``start`` to the task's success; the shortest action list or None."""
    order = _ACTION_ORDER_WITH_DROP if layout.allow_drop else _ACTION_ORDER
    parents: dict[Node, tuple[Node, int] | None] = {start: None}
    frontier = deque([start])
    while frontier:
        node = frontier.popleft()
        for action in order:
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


def plan(state: SymbolicState, task: Task = GOAL_TASK) -> list[int] | None:
    """The shortest action sequence from ``state`` that completes ``task`` (by default: reach a goal
    tile), or None if none exists. Balls are obstacles where they stand, moving or not."""
    return _search(*_layout_and_node(state, task))


def _facing(state: SymbolicState) -> tuple[int, int, int] | None:
    """The (object, colour, state) of the cell in front of the agent, None off the grid."""
    dx, dy = _DIR_TO_VEC[state.agent_dir]
    fx, fy = state.agent_pos[0] + dx, state.agent_pos[1] + dy
    if not (0 <= fx < state.width and 0 <= fy < state.height):
        return None
    return tuple(int(v) for v in state.grid[fx, fy])  # type: ignore[return-value]


class Oracle:
    """Optimal actions for one grid size and task; remembers its last plan so following it costs no search.

    ``action(state_array)`` returns the first action of a shortest plan (``FORWARD`` is preferred
    among ties, then left, right, pickup, toggle, drop). If the state is unsolvable it returns None.

    With ``task.moving_obstacles`` (Dynamic-Obstacles) it re-plans every step on the state as it is,
    the balls where they stand now treated as walls, so it never walks into a ball or a wall (the
    only way to lose: a ball never moves onto the agent). When the balls block every path it takes
    the first step of a plan that ignores them, turning instead of walking into one. It does not
    predict where the balls go, so it is a strong reference, not an upper bound: a planner that
    anticipates the balls could be faster.
    """

    def __init__(self, codec: StateCodec, task: Task = GOAL_TASK):
        self.codec = codec
        self.task = task
        self._expected: Node | None = None
        self._remaining: list[int] = []

    def plan(self, state_array: np.ndarray) -> list[int] | None:
        return plan(self.codec.decode(state_array), self.task)

    def action(self, state_array: np.ndarray) -> int | None:
        state = self.codec.decode(state_array)
        if self.task.moving_obstacles:
            return self._replan(state)
        layout, node = _layout_and_node(state, self.task)
        if self._remaining and node == self._expected:
            actions = self._remaining
        else:
            actions = _search(layout, node)  # off the remembered plan (first call, a random action, a reset)
            if not actions:
                self._expected, self._remaining = None, []
                return None
        first = actions[0]
        self._expected, _ = _step(layout, node, first)
        self._remaining = actions[1:]
        return first

    def _replan(self, state: SymbolicState) -> int | None:
        actions = plan(state, self.task)
        if actions:
            return actions[0]
        actions = _search(*_layout_and_node(state, self.task, ignore_balls=True))
        if not actions:
            return None
        front = _facing(state)
        if actions[0] == FORWARD and front is not None and front[0] == BALL:
            return LEFT  # the way is blocked by a ball for now: turning is always safe
        return actions[0]

    def reset(self) -> None:
        self._expected, self._remaining = None, []


def plan_to_pose(state: SymbolicState, poses: set[tuple[int, int, int]]) -> list[int] | None:
    """The shortest list of moves (left, right, forward) from ``state`` to any of ``poses``
    ((x, y, direction) triples), or None if none is reachable ([] when already there).

    Doors, keys and the carried object stay as they are; the agent never enters lava or a goal
    tile (either would end the episode) and treats balls as walls where they stand now. Probes and
    scripted walks use it to put the agent where a rule applies.
    """
    # Only the layout matters here (no action completes the task): any task the state supports will do.
    layout, start = _layout_and_node(state, GOAL_TASK if state.goal_positions else Task("pickup", BALL))
    targets = {(int(x), int(y), int(d)) for x, y, d in poses}
    if start[:3] in targets:
        return []
    parents: dict[Node, tuple[Node, int] | None] = {start: None}
    frontier = deque([start])
    while frontier:
        node = frontier.popleft()
        for action in (FORWARD, LEFT, RIGHT):
            child, success = _step(layout, node, action)
            if child is None or success or child in parents:
                continue
            parents[child] = (node, action)
            if child[:3] in targets:
                actions = []
                while parents[child] is not None:
                    child, previous = parents[child]  # type: ignore[misc]
                    actions.append(previous)
                return actions[::-1]
            frontier.append(child)
    return None


def plan_to_state(state: SymbolicState, target: SymbolicState) -> list[int] | None:
    """The shortest action list from ``state`` to ``target`` (the same agent pose, carried object,
    door states and key positions; the static layout is the start's), or None if no list reaches it
    ([] when already there). Drops count as moves here (a goal frame may show a key put down
    elsewhere); stepping onto a goal tile or lava ends the episode, so only a target there may be
    reached that way. The yardstick of planning to a goal frame (``agents.planner``)."""
    layout, start = _layout_and_node(state, GOAL_TASK if state.goal_positions else Task("pickup", BALL))
    _, goal = _layout_and_node(target, GOAL_TASK if target.goal_positions else Task("pickup", BALL))
    if start == goal:
        return []
    parents: dict[Node, tuple[Node, int] | None] = {start: None}
    frontier = deque([start])
    while frontier:
        node = frontier.popleft()
        for action in _ACTION_ORDER_WITH_DROP:
            child, ends = _step(layout, node, action)
            if child is None or child in parents:
                continue
            parents[child] = (node, action)
            if child == goal:
                actions = []
                while parents[child] is not None:
                    child, previous = parents[child]  # type: ignore[misc]
                    actions.append(previous)
                return actions[::-1]
            if not ends:
                frontier.append(child)
    return None
