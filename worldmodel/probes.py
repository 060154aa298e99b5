"""Rule probes: exact tests of what a world model knows of the gridworld's rules.

A probe is one real situation where a known rule decides the next step: the real history from an
env reset up to a state where the rule applies (frames and actions, so a model with memory has
seen what the agent saw), the probe action, and the real env's answer (next frame, reward,
termination, next symbolic state). Probes are built by walking real envs from their reset on
given seeds (held-out seeds: see :func:`held_out_seeds`), with the BFS oracle and
:func:`envs.oracle.plan_to_pose` to reach the situations:

- ``wall_forward``: facing a wall, forward: nothing changes (Dynamic-Obstacles: the episode ends, -1)
- ``turn``: left or right anywhere: only the agent's direction changes
- ``locked_door_without_key``: facing a locked door empty-handed, toggle: it stays locked
- ``locked_door_with_key``: facing it with its key, toggle: it opens
- ``key_pickup``: facing a key, pick up: it leaves the floor and is carried
- ``key_drop``: carrying the key, facing an empty cell, drop: it lies in front, hands empty
- ``open_door_walk``: facing a door just opened, forward: the agent stands in the doorway
- ``lava``: facing lava, forward: the episode ends with no reward
- ``goal``: facing the goal, forward: the episode ends with a reward
- ``obstacle_contact``: facing a ball on Dynamic-Obstacles, forward: the episode ends, -1
- ``permanence`` (egocentric view): where static objects are in view, turn three times the same
  way (they leave the view), then the probe turn brings the first view back: it shows them again

:func:`judge` checks a prediction against the rule: the next frame's tiles that the history
determines (full view: every tile; egocentric: tiles showing cells seen before; Dynamic-Obstacles:
not the cells a ball may move to) equal the real ones, the termination is the real one, the reward
has the real one's sign (the success reward's size depends on the step count, which the model does
not see), and the carried object, where the predictor states one, is the real one.
:func:`evaluate` runs a world model on probes and counts how often its predictions obey.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from envs.make import make_env
from envs.oracle import BALL, DROP, FORWARD, LEFT, PICKUP, RIGHT, TOGGLE, Oracle, plan_to_pose, task_for_env
from envs.state import DOOR, DOOR_LOCKED, DOOR_OPEN, EMPTY, GOAL, KEY, LAVA, WALL, SymbolicState

RULES = ("wall_forward", "turn", "locked_door_without_key", "locked_door_with_key", "key_pickup", "key_drop",
         "open_door_walk", "lava", "goal", "obstacle_contact", "permanence")
_DIR_TO_VEC = ((1, 0), (0, 1), (-1, 0), (0, -1))
_STANDABLE = (EMPTY, 3)  # empty and floor: where a walk may stop
_STATIC_OBJECTS = (KEY, DOOR, GOAL, LAVA)  # what the permanence probe expects to see again
REWARD_TOLERANCE = 0.05  # |reward| below this counts as no reward


@dataclass
class Probe:
    """One rule instance: the real history up to the probe state, the probe action, the real answer."""

    rule: str
    env_id: str
    view: str
    seed: int
    frames: np.ndarray  # (T0, H, W, 3) uint8: the history from the reset; the last is the probe state's
    actions: np.ndarray  # (T0 - 1,) int64: the actions between those frames
    action: int  # the probe action
    next_frame: np.ndarray  # (H, W, 3) uint8: the real env's next frame
    reward: float
    terminated: bool
    state: np.ndarray  # (S,) the probe state (envs.state codec)
    next_state: np.ndarray  # (S,)
    judged: np.ndarray  # (rows, cols) bool: the next frame's tiles the history determines
    tile_size: int


@dataclass
class Prediction:
    """What a predictor says follows a probe: per-tile identities of the next frame (token ids, or
    :func:`frame_cells` of a frame), reward, termination, and the carried object if it states one."""

    cells: np.ndarray  # (rows, cols)
    reward: float
    terminated: bool
    carrying: tuple[int, int, int] | None = None  # (object, colour, state); None: not stated


@dataclass
class Verdict:
    """Which parts of a prediction obey the rule (``carrying`` None: the predictor stated none)."""

    frame: bool
    outcome: bool
    carrying: bool | None

    @property
    def obeys(self) -> bool:
        return self.frame and self.outcome and self.carrying is not False


def frame_cells(frame: np.ndarray, tile_size: int) -> np.ndarray:
    """(H, W, 3) uint8 frame -> (H / tile, W / tile) array of per-tile byte strings (comparable with ==)."""
    frame = np.asarray(frame)
    h, w = frame.shape[0] // tile_size, frame.shape[1] // tile_size
    tiles = frame.reshape(h, tile_size, w, tile_size, 3).transpose(0, 2, 1, 3, 4).reshape(h, w, -1)
    return np.ascontiguousarray(tiles).view(np.dtype((np.void, tiles.shape[-1])))[..., 0]


def carried(state: np.ndarray) -> tuple[int, int, int]:
    """The (object, colour, state) a codec state array says the agent carries (its last 3 fields)."""
    return tuple(int(v) for v in np.asarray(state)[-3:])  # type: ignore[return-value]


def _reward_sign(reward: float) -> int:
    return 0 if abs(reward) < REWARD_TOLERANCE else int(np.sign(reward))


def judge(probe: Probe, prediction: Prediction, reference: np.ndarray | None = None) -> Verdict:
    """Does ``prediction`` obey the probe's rule? ``reference``: the real next frame's cells in the
    prediction's terms (e.g. its tokens); default :func:`frame_cells` of ``probe.next_frame``."""
    if reference is None:
        reference = frame_cells(probe.next_frame, probe.tile_size)
    cells = np.asarray(prediction.cells)
    if cells.shape != reference.shape or cells.shape != probe.judged.shape:
        raise ValueError(f"prediction cells {cells.shape}, reference {reference.shape} and the probe's "
                         f"tiles {probe.judged.shape} must agree")
    frame_ok = bool(np.array_equal(cells[probe.judged], reference[probe.judged]))
    outcome_ok = bool(prediction.terminated) == probe.terminated and \
        _reward_sign(float(prediction.reward)) == _reward_sign(probe.reward)
    carrying_ok = None if prediction.carrying is None else tuple(int(v) for v in prediction.carrying) == carried(probe.next_state)
    return Verdict(frame=frame_ok, outcome=outcome_ok, carrying=carrying_ok)


def real_prediction(probe: Probe, frame: np.ndarray | None = None) -> Prediction:
    """The real env's answer as a prediction (``frame`` replaces its next frame): what the judges are tested with."""
    return Prediction(cells=frame_cells(probe.next_frame if frame is None else frame, probe.tile_size),
                      reward=probe.reward, terminated=probe.terminated, carrying=carried(probe.next_state))


# ---------------------------------------------------------------------------------------------
# Building probes: walks in real envs
# ---------------------------------------------------------------------------------------------


class _Walk:
    """A real env from its reset on one seed, recording frames, actions and the cells seen so far."""

    def __init__(self, env_id: str, view: str, seed: int, tile_size: int):
        self.env = make_env(env_id, obs=view, tile_size=tile_size)
        frame, info = self.env.reset(seed=seed)
        self.env_id, self.view, self.seed, self.tile_size = env_id, view, seed, tile_size
        self.frames, self.states, self.actions = [frame], [info["state"]], []
        self.over = False
        self.task = task_for_env(self.env)
        self.seen = set(self.visible())

    @property
    def state(self) -> SymbolicState:
        return self.env.codec.decode(self.states[-1])

    def visible(self) -> dict[tuple[int, int], tuple[int, int]]:
        """World cell (x, y) -> the tile (row, col) of the current frame that shows it, for every cell in view."""
        base = self.env.unwrapped
        if self.view == "full":
            return {(x, y): (y, x) for x in range(base.width) for y in range(base.height)}
        _, vis_mask = base.gen_obs_grid()
        shown = {}
        for x in range(base.width):
            for y in range(base.height):
                view = base.relative_coords(x, y)
                if view is not None and vis_mask[view[0], view[1]]:
                    shown[(x, y)] = (int(view[1]), int(view[0]))
        return shown

    def step(self, action: int) -> None:
        frame, _, terminated, truncated, info = self.env.step(int(action))
        self.frames.append(frame)
        self.states.append(info["state"])
        self.actions.append(int(action))
        self.over = terminated or truncated
        self.seen |= set(self.visible())

    def probe(self, rule: str, action: int) -> Probe | None:
        """Take ``action`` as the probe of ``rule`` (None if the episode is over or would be truncated)."""
        base = self.env.unwrapped
        if self.over or base.step_count + 1 >= base.max_steps:
            return None
        state, seen = self.states[-1], set(self.seen)
        # A ball may move to any cell of the 3x3 block around it but the agent's: those cells are not determined.
        moving = {(bx + dx, by + dy) for bx, by, _, _ in self.state.objects(BALL)
                  for dx in (-1, 0, 1) for dy in (-1, 0, 1)} if self.task.moving_obstacles else set()
        moving.discard(tuple(int(v) for v in self.state.agent_pos))
        frame, reward, terminated, truncated, info = self.env.step(int(action))
        rows, cols = frame.shape[0] // self.tile_size, frame.shape[1] // self.tile_size
        judged = np.zeros((rows, cols), dtype=bool)
        for cell, (row, col) in self.visible().items():
            judged[row, col] = cell in seen and cell not in moving
        self.over = True
        return Probe(rule=rule, env_id=self.env_id, view=self.view, seed=self.seed, frames=np.stack(self.frames),
                     actions=np.asarray(self.actions, dtype=np.int64), action=int(action), next_frame=frame,
                     reward=float(reward), terminated=bool(terminated), state=state, next_state=info["state"],
                     judged=judged, tile_size=self.tile_size)


def _front(state: SymbolicState, x: int, y: int, d: int) -> tuple[int, int, tuple[int, int, int] | None]:
    dx, dy = _DIR_TO_VEC[d]
    fx, fy = x + dx, y + dy
    if not (0 <= fx < state.width and 0 <= fy < state.height):
        return fx, fy, None
    return fx, fy, tuple(int(v) for v in state.grid[fx, fy])  # type: ignore[return-value]


def _poses(state: SymbolicState, facing: Callable[[tuple[int, int, int]], bool]) -> list[tuple[int, int, int]]:
    """Every (x, y, direction) on a standable cell whose front cell satisfies ``facing((object, colour, state))``."""
    poses = []
    for x in range(state.width):
        for y in range(state.height):
            if state.grid[x, y, 0] not in _STANDABLE:
                continue
            for d in range(4):
                _, _, front = _front(state, x, y, d)
                if front is not None and facing(front):
                    poses.append((x, y, d))
    return poses


def _pose(state: SymbolicState) -> tuple[int, int, int]:
    return int(state.agent_pos[0]), int(state.agent_pos[1]), int(state.agent_dir)


def _walk_to(walk: _Walk, facing: Callable[[tuple[int, int, int]], bool], rng: np.random.Generator,
             max_steps: int = 120) -> bool:
    """Walk to a random reachable pose facing what ``facing`` accepts (moving obstacles: a few random
    moves, then the nearest, re-planned every step around the balls where they are). False if none
    is reached."""
    if walk.task.moving_obstacles:
        if not _random_start(walk, rng):  # a few random moves first: the nearest pose then varies
            return False
        for _ in range(max_steps):
            state = walk.state
            targets = set(_poses(state, facing))
            if _pose(state) in targets:
                return True
            plan = plan_to_pose(state, targets) if targets else None
            walk.step(plan[0] if plan else LEFT)  # a turn is always safe; a planned forward never hits a ball
            if walk.over:
                return False
        return False
    state = walk.state
    candidates = _poses(state, facing)
    for index in rng.permutation(len(candidates))[:20]:
        plan = plan_to_pose(state, {candidates[index]})
        if plan is None:
            continue
        for action in plan:
            walk.step(action)
        return not walk.over
    return False


def _follow_oracle(walk: _Walk, stop: Callable[[SymbolicState, int], bool], max_steps: int = 300) -> int | None:
    """Follow the oracle until its next action satisfies ``stop(state, action)``; return that action."""
    oracle = Oracle(walk.env.codec, walk.task)
    for _ in range(max_steps):
        action = oracle.action(walk.states[-1])
        if action is None:
            return None
        if stop(walk.state, action):
            return action
        walk.step(action)
        if walk.over:
            return None
    return None


def _facing_kind(state: SymbolicState, kind: int, door_state: int | None = None) -> bool:
    _, _, front = _front(state, *_pose(state))
    return front is not None and front[0] == kind and (door_state is None or front[2] == door_state)


def _random_start(walk: _Walk, rng: np.random.Generator) -> bool:
    """A random reachable pose first, so that oracle-driven probes do not all start alike (moving
    obstacles: up to 8 random moves, forward only into an empty cell, which never ends the episode)."""
    if not walk.task.moving_obstacles:
        return _walk_to(walk, lambda front: True, rng)
    for _ in range(int(rng.integers(0, 9))):
        state = walk.state
        _, _, front = _front(state, *_pose(state))
        clear = front is not None and front[0] == EMPTY
        walk.step(int(rng.choice([LEFT, RIGHT, FORWARD] if clear else [LEFT, RIGHT])))
        if walk.over:
            return False
    return True


def _wall_forward(walk: _Walk, rng: np.random.Generator) -> Probe | None:
    return walk.probe("wall_forward", FORWARD) if _walk_to(walk, lambda f: f[0] == WALL, rng) else None


def _turn(walk: _Walk, rng: np.random.Generator) -> Probe | None:
    return walk.probe("turn", int(rng.choice([LEFT, RIGHT]))) if _random_start(walk, rng) else None


def _locked_door_without_key(walk: _Walk, rng: np.random.Generator) -> Probe | None:
    if walk.state.carrying[0] != EMPTY or not _walk_to(walk, lambda f: f[0] == DOOR and f[2] == DOOR_LOCKED, rng):
        return None
    return walk.probe("locked_door_without_key", TOGGLE)


def _locked_door_with_key(walk: _Walk, rng: np.random.Generator) -> Probe | None:
    if not _random_start(walk, rng):
        return None
    action = _follow_oracle(walk, lambda s, a: a == TOGGLE and s.carrying[0] == KEY and _facing_kind(s, DOOR, DOOR_LOCKED))
    return None if action is None else walk.probe("locked_door_with_key", action)


def _key_pickup(walk: _Walk, rng: np.random.Generator) -> Probe | None:
    if not _random_start(walk, rng):
        return None
    action = _follow_oracle(walk, lambda s, a: a == PICKUP and _facing_kind(s, KEY))
    return None if action is None else walk.probe("key_pickup", action)


def _key_drop(walk: _Walk, rng: np.random.Generator) -> Probe | None:
    if not _random_start(walk, rng) or _follow_oracle(walk, lambda s, a: a == PICKUP and _facing_kind(s, KEY)) is None:
        return None
    walk.step(PICKUP)
    if walk.over or walk.state.carrying[0] != KEY or not _walk_to(walk, lambda f: f[0] == EMPTY, rng):
        return None
    return walk.probe("key_drop", DROP)


def _open_door_walk(walk: _Walk, rng: np.random.Generator) -> Probe | None:
    if not _random_start(walk, rng):
        return None
    action = _follow_oracle(walk, lambda s, a: a == FORWARD and _facing_kind(s, DOOR, DOOR_OPEN))
    return None if action is None else walk.probe("open_door_walk", action)


def _lava(walk: _Walk, rng: np.random.Generator) -> Probe | None:
    return walk.probe("lava", FORWARD) if _walk_to(walk, lambda f: f[0] == LAVA, rng) else None


def _goal(walk: _Walk, rng: np.random.Generator) -> Probe | None:
    if not _random_start(walk, rng):
        return None
    action = _follow_oracle(walk, lambda s, a: a == FORWARD and _facing_kind(s, GOAL))
    return None if action is None else walk.probe("goal", action)


def _obstacle_contact(walk: _Walk, rng: np.random.Generator) -> Probe | None:
    return walk.probe("obstacle_contact", FORWARD) if _walk_to(walk, lambda f: f[0] == BALL, rng) else None


def _static_objects_in_view(walk: _Walk) -> set[tuple[int, int]]:
    state = walk.state
    return {cell for cell in walk.visible() if state.grid[cell[0], cell[1], 0] in _STATIC_OBJECTS}


def _permanence(walk: _Walk, rng: np.random.Generator) -> Probe | None:
    for _ in range(4):  # a few random poses until static objects are in view
        if not _random_start(walk, rng):
            return None
        objects = _static_objects_in_view(walk)
        if objects:
            break
    else:
        return None
    turn = int(rng.choice([LEFT, RIGHT]))
    for _ in range(3):
        walk.step(turn)
    if walk.over or objects <= set(walk.visible()):
        return None  # they never left the view: not a memory test
    return walk.probe("permanence", turn)


_BUILDERS: dict[str, Callable[[_Walk, np.random.Generator], Probe | None]] = {
    "wall_forward": _wall_forward, "turn": _turn, "locked_door_without_key": _locked_door_without_key,
    "locked_door_with_key": _locked_door_with_key, "key_pickup": _key_pickup, "key_drop": _key_drop,
    "open_door_walk": _open_door_walk, "lava": _lava, "goal": _goal, "obstacle_contact": _obstacle_contact,
    "permanence": _permanence,
}


def rules_for(env_id: str, view: str, seed: int = 0) -> list[str]:
    """The rules that hold on ``env_id`` in ``view``, from what its grid holds after a reset with ``seed``."""
    env = make_env(env_id, obs=view)
    try:
        _, info = env.reset(seed=seed)
        state = env.codec.decode(info["state"])
        task = task_for_env(env)
    finally:
        env.close()
    kinds = set(np.unique(state.grid[:, :, 0]).tolist())
    locked = any(s == DOOR_LOCKED for _, _, _, s in state.objects(DOOR))
    rules = ["wall_forward", "turn"]
    if locked and KEY in kinds:
        rules += ["locked_door_without_key", "locked_door_with_key", "key_pickup", "key_drop"]
    if DOOR in kinds:
        rules.append("open_door_walk")
    if LAVA in kinds:
        rules.append("lava")
    if GOAL in kinds:
        rules.append("goal")
    if task.moving_obstacles:
        rules.append("obstacle_contact")
    elif view == "partial":
        rules.append("permanence")
    return rules


def held_out_seeds(card: dict, count: int) -> range:
    """``count`` env seeds after the last one a dataset's card records (its episodes never reset with them)."""
    first = int(card["seeds"]["last"]) + 1
    return range(first, first + int(count))


def build_probes(env_id: str, view: str, rule: str, seeds: Iterable[int], instances: int,
                 tile_size: int = 8) -> list[Probe]:
    """Up to ``instances`` probes of ``rule``, at most one per seed, in seed order (a seed where the
    rule's situation cannot be reached gives none)."""
    if rule not in _BUILDERS:
        raise ValueError(f"unknown rule '{rule}': choose one of {RULES}")
    probes: list[Probe] = []
    for seed in seeds:
        walk = _Walk(env_id, view, int(seed), tile_size)
        try:
            probe = _BUILDERS[rule](walk, np.random.default_rng([int(seed), RULES.index(rule)]))
        finally:
            walk.env.close()
        if probe is not None:
            probes.append(probe)
            if len(probes) >= instances:
                break
    return probes


# ---------------------------------------------------------------------------------------------
# A world model on the probes
# ---------------------------------------------------------------------------------------------


def tokenize(world_model: Any, probes: list[Probe]) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Every probe's history (T0, h, w) and next frame (h, w) in tokens, and the share of probes
    whose tokens had to be made canonical.

    Canonical: a token the dynamics model never saw as a target (not in ``dynamics.output_tokens``)
    whose decoded tile is pixel for pixel that of a token it saw is replaced by that token. A
    tokenizer with two codes for one tile (a near tie in its codebook, settled by float rounding
    that depends on the batch) otherwise hands the model tokens it was not trained on for frames
    it knows; the share measures that tokenizer defect apart from what the model knows.
    """
    lengths = [len(p.frames) for p in probes]
    frames = np.concatenate([p.frames for p in probes] + [np.stack([p.next_frame for p in probes])])
    tokens = torch_numpy(world_model.encode(frames)).astype(np.int64)
    canonical = _canonical_tokens(world_model, tokens)
    offsets = np.cumsum([0] + lengths)
    remapped = [not np.array_equal(canonical[a:b], tokens[a:b]) or
                not np.array_equal(canonical[offsets[-1] + i], tokens[offsets[-1] + i])
                for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))]
    histories = [canonical[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return histories, canonical[offsets[-1]:], round(float(np.mean(remapped)), 4)


def _canonical_tokens(world_model: Any, tokens: np.ndarray) -> np.ndarray:
    known = getattr(getattr(world_model, "dynamics", None), "output_tokens", None)
    if known is None:
        return tokens
    known = sorted(torch_numpy(known).tolist())
    unknown = sorted(set(np.unique(tokens).tolist()) - set(known))
    if not unknown:
        return tokens
    patch = int(world_model.tokenizer.patch_size)

    def tiles(ids: list[int]) -> np.ndarray:  # (K,) per-tile bytes of the decoded tokens
        return frame_cells(torch_numpy(world_model.decode(np.array(ids, dtype=np.int64)[None, :])), patch)[0]

    known_tiles = tiles(known)
    mapping = np.arange(int(tokens.max()) + 1)
    for token, tile in zip(unknown, tiles(unknown)):
        same = np.nonzero(known_tiles == tile)[0]
        if len(same):
            mapping[token] = known[int(same[0])]
    return mapping[tokens]


def torch_numpy(values: Any) -> np.ndarray:
    return values.cpu().numpy() if hasattr(values, "cpu") else np.asarray(values)


def predict(world_model: Any, probes: list[Probe], batch_size: int = 64,
            tokens: tuple[list[np.ndarray], np.ndarray] | None = None) -> list[tuple[Prediction, np.ndarray]]:
    """The world model's prediction for every probe (in token cells) and the real next frame's tokens.

    ``world_model``: a :class:`worldmodel.imagine.WorldModel` (its sampling decides greedy or not);
    each probe's whole history is its context (tokenised by :func:`tokenize`), probes of one history
    length run as one batch. ``tokens``: :func:`tokenize`'s result, if already computed.
    """
    histories, references = tokenize(world_model, probes)[:2] if tokens is None else tokens
    out: list[tuple[Prediction, np.ndarray] | None] = [None] * len(probes)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, probe in enumerate(probes):
        by_length[len(probe.frames)].append(i)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            world_model.reset(np.stack([histories[i] for i in chunk]), np.stack([probes[i].actions for i in chunk]))
            step = world_model.step(np.array([probes[i].action for i in chunk]))
            predicted, reward = torch_numpy(step.tokens), torch_numpy(step.reward)
            terminated, state = torch_numpy(step.terminated), torch_numpy(step.state)
            for j, i in enumerate(chunk):
                out[i] = (Prediction(cells=predicted[j], reward=float(reward[j]), terminated=bool(terminated[j]),
                                     carrying=carried(state[j])), references[i])
    return out  # type: ignore[return-value]


def evaluate(world_model: Any, probes: list[Probe]) -> dict:
    """How often the model's predictions obey the probes' rule: ``rate`` (all parts), ``instances``,
    the parts' rates (``frame``, ``outcome``, ``carrying``), ``tokenizer_exact`` (the share of
    probes whose real next frame the tokenizer reconstructs exactly on the judged tiles: below 1,
    the token comparison is blind to what the tokenizer confuses), ``tokens_made_canonical`` (the
    share of probes whose tokens :func:`tokenize` had to make canonical: above 0, the tokenizer
    gives one tile two codes) and ``no_change_baseline`` (the
    rate of a predictor of "nothing happens": current frame, no reward, no end, same hands)."""
    if not probes:
        return {"rate": None, "instances": 0}
    histories, references, remapped = tokenize(world_model, probes)
    predictions = predict(world_model, probes, tokens=(histories, references))
    verdicts = [judge(p, prediction, reference) for p, (prediction, reference) in zip(probes, predictions)]
    decoded = torch_numpy(world_model.decode(references))
    tokenizer_exact = [np.array_equal(frame_cells(d, p.tile_size)[p.judged], frame_cells(p.next_frame, p.tile_size)[p.judged])
                       for d, p in zip(decoded, probes)]

    # What a model that predicts nothing happens would score: the rules where nothing changes need it.
    unchanged = [judge(p, Prediction(frame_cells(p.frames[-1], p.tile_size), 0.0, False, carried(p.state))).obeys
                 for p in probes]

    def rate(values: list[bool]) -> float:
        return round(float(np.mean(values)), 4)

    return {"rate": rate([v.obeys for v in verdicts]), "instances": len(verdicts),
            "frame": rate([v.frame for v in verdicts]), "outcome": rate([v.outcome for v in verdicts]),
            "carrying": rate([bool(v.carrying) for v in verdicts]),
            "tokenizer_exact": rate(tokenizer_exact), "tokens_made_canonical": remapped,
            "no_change_baseline": rate(unchanged),
            "judged_tiles_mean": round(float(np.mean([p.judged.sum() for p in probes])), 1)}
