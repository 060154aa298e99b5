"""Stochastic worlds: the env's own next-state distribution from a state, the world model's, and
how far apart they are (Dynamic-Obstacles: balls that move at random every step).

- :func:`env_next_samples` steps many copies of one env from the same state, each copy's random
  generator reseeded (a copied env also copies its generator: unreseeded, every copy would draw
  the same move).
- :func:`probe_envs` picks probe states (env, action) from a dataset's held-out transitions.
- :func:`obstacle_move_tv` compares, per obstacle, the distribution of its next position under
  the env and under the world model (sampled with a :class:`~worldmodel.imagine.SamplingConfig`),
  as a total variation distance averaged over obstacles and probes; it also measures the cells the
  env's draw does not decide (``determined`` exactness) and how often a sample holds the right
  number of obstacles.

Obstacles look alike, so a frame does not say which ball went where. Both sides are read the same
way: the next positions are matched to the current ones by the assignment of least total
Chebyshev distance (ties: the first in a fixed order); an obstacle left without a match is
"missing" (an outcome of its own).
"""

from __future__ import annotations

import itertools
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

MISSING = (-1, -1)  # an obstacle the sampled frame lost


@dataclass
class Probe:
    """A state to sample next states from: ``env`` (an env of :func:`envs.make.make_env`) in that
    state, the ``action`` taken there, and the current obstacle cells ``obstacles`` [(x, y)]."""

    env: Any
    action: int
    obstacles: list[tuple[int, int]]
    obstacle_type: str = "ball"


@dataclass
class StochasticResult:
    """Per-probe figures of :func:`obstacle_move_tv` (P probes)."""

    tv: np.ndarray  # (P,) per-probe mean over obstacles of the TV distance, model vs env
    floor: np.ndarray  # (Q,) the same between two independent env sample sets (the estimate's noise), Q <= P
    count_right: np.ndarray  # (P,) share of model samples with as many obstacles as the env has
    determined_exact: np.ndarray  # (P,) share of model samples right on every determined cell
    determined_cells: np.ndarray  # (P,) how many cells the env's draw does not decide
    extras: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        return {
            "obstacle_move_tv": round(float(self.tv.mean()), 4),
            "obstacle_move_tv_env_vs_env": round(float(self.floor.mean()), 4) if len(self.floor) else float("nan"),
            "obstacle_count_right": round(float(self.count_right.mean()), 4),
            "determined_exact": round(float(self.determined_exact.mean()), 4),
            "probes": int(len(self.tv)),
            **self.extras,
        }


# ---------------------------------------------------------------------------------------------
# The env's side
# ---------------------------------------------------------------------------------------------


def obstacle_cells(base_env: Any, obstacle_type: str = "ball") -> list[tuple[int, int]]:
    """Cells (x, y) of the objects of ``obstacle_type`` on an unwrapped MiniGrid env's grid (row-major)."""
    grid = base_env.grid
    return [(x, y) for y in range(grid.height) for x in range(grid.width)
            if grid.get(x, y) is not None and grid.get(x, y).type == obstacle_type]


def env_next_samples(env: Any, action: int, samples: int, seed: int, obstacle_type: str = "ball",
                     frames: int = 0) -> tuple[list[list[tuple[int, int]]], np.ndarray | None]:
    """Step ``samples`` copies of ``env`` (a :func:`envs.make.make_env` env) by ``action`` from its
    current state, copy i's generator reseeded with (seed, i).

    -> (per sample the obstacle cells [(x, y)] after the step, frames (F, H, W, 3) uint8 of the
    first ``frames`` samples rendered (None if 0)). The env itself is left as it was.
    """
    blob = pickle.dumps(env)  # loading a pickle is ~2x faster than copy.deepcopy
    positions, rendered = [], []
    for i in range(int(samples)):
        copy = pickle.loads(blob)
        copy.unwrapped.np_random = np.random.default_rng([int(seed), i])
        if i < frames:
            frame = copy.step(int(action))[0]
            rendered.append(np.asarray(frame))
        else:
            copy.unwrapped.step(int(action))  # no frame wanted: skip the wrapper's render
        positions.append(obstacle_cells(copy.unwrapped, obstacle_type))
    return positions, (np.stack(rendered) if rendered else None)


def probe_envs(dataset: Any, env_id: str, count: int, seed: int = 0, obs: str = "full",
               tile_size: int = 8, obstacle_type: str = "ball") -> list[Probe]:
    """``count`` probe states from ``dataset``'s transitions (drawn without replacement with
    ``seed``) that hold an obstacle: the env rebuilt from each state (:func:`envs.make.env_from_state`)
    with the dataset's action there."""
    from envs.make import env_from_state

    rng = np.random.default_rng(seed)
    lengths = np.asarray(dataset.episode_lengths)
    starts = np.asarray(dataset.episode_starts)
    frames = np.concatenate([starts[e] + np.arange(lengths[e]) for e in range(len(lengths))])  # frames with an action
    probes: list[Probe] = []
    for index in rng.permutation(frames):
        env = env_from_state(env_id, dataset.states[index], obs=obs, tile_size=tile_size,
                             seed=int(rng.integers(2**31 - 1)))
        obstacles = obstacle_cells(env.unwrapped, obstacle_type)
        if obstacles:
            probes.append(Probe(env=env, action=int(dataset.actions[index]), obstacles=obstacles,
                                obstacle_type=obstacle_type))
        if len(probes) >= count:
            break
    if len(probes) < count:
        raise ValueError(f"only {len(probes)} transitions with an obstacle in the dataset; {count} probes asked")
    return probes


# ---------------------------------------------------------------------------------------------
# Reading and comparing samples
# ---------------------------------------------------------------------------------------------


def match_obstacles(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The next cell of each obstacle in ``before`` (M cells) among the cells ``after``: the
    assignment of least total Chebyshev distance, the first such in a fixed order; obstacles left
    over get :data:`MISSING`, extra cells are dropped."""
    m = len(before)
    after = sorted(set(map(tuple, after)))
    slots = list(after) + [MISSING] * max(0, m - len(after))
    best, best_cost = None, None
    for chosen in itertools.permutations(range(len(slots)), m):
        cost = 0
        for i, j in enumerate(chosen):
            cell = slots[j]
            cost += 100 if cell == MISSING else max(abs(cell[0] - before[i][0]), abs(cell[1] - before[i][1]))
        if best_cost is None or cost < best_cost:
            best, best_cost = chosen, cost
    assert best is not None or m == 0
    return [slots[j] for j in best] if best is not None else []


def _distributions(before: list[tuple[int, int]], samples: list[list[tuple[int, int]]]) -> list[dict]:
    """Per obstacle, its matched next cell's empirical distribution {cell: probability}."""
    counts: list[dict] = [{} for _ in before]
    cache: dict = {}
    for cells in samples:
        key = tuple(sorted(map(tuple, cells)))
        if key not in cache:
            cache[key] = match_obstacles(before, list(key))
        for i, cell in enumerate(cache[key]):
            counts[i][cell] = counts[i].get(cell, 0) + 1
    return [{cell: n / len(samples) for cell, n in c.items()} for c in counts]


def total_variation(p: dict, q: dict) -> float:
    """Total variation distance between two distributions given as {outcome: probability}."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def obstacle_tv(before: list[tuple[int, int]], model: list[list[tuple[int, int]]],
                env: list[list[tuple[int, int]]]) -> float:
    """Mean over the obstacles ``before`` of the TV distance between the model's and the env's
    distributions of their next cell (each side a list of samples of the next obstacle cells)."""
    return float(np.mean([total_variation(p, q) for p, q in zip(_distributions(before, model),
                                                                 _distributions(before, env))]))


def cells_of_token(tokens: np.ndarray, token_ids: set[int]) -> list[list[tuple[int, int]]]:
    """tokens (S, h, w) of full-view frames (one token per cell) -> per frame the cells (x, y) holding one of ``token_ids``."""
    hit = np.isin(tokens, list(token_ids))
    return [[(int(x), int(y)) for y, x in zip(*np.nonzero(frame))] for frame in hit]


# ---------------------------------------------------------------------------------------------
# The model's side and the measure
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def model_next_tokens(world_model: Any, tokens: np.ndarray, action: int, samples: int, sampling: Any,
                      seed: int) -> np.ndarray:
    """``samples`` next frames drawn by ``world_model`` from one frame's tokens (h, w) and action:
    -> tokens (samples, h, w). The world model's generator is seeded with ``seed``."""
    world_model.seed(seed)
    world_model.reset(np.repeat(np.asarray(tokens)[None], samples, axis=0))
    step = world_model.step(np.full(samples, int(action)), sampling=sampling)
    return step.tokens.cpu().numpy()


def obstacle_move_tv(world_model: Any, probes: list[Probe], samples: int = 1000, sampling: Any = None,
                     seed: int = 0, env_samples: int = 0, floor_probes: int = 50,
                     determined_frames: int = 64) -> StochasticResult:
    """The world model's next-obstacle distribution against the env's, over ``probes``.

    Per probe: ``samples`` model draws (``sampling``, default the world model's own) and
    ``env_samples`` (default ``samples``) env draws (reseeded copies); per obstacle the TV distance
    of the two distributions of its next cell (obstacles matched as the module says), averaged.
    The first ``floor_probes`` probes also get a second, independent env sample set: their TV
    (``floor``) is what the estimate reads when both sides are the env (finite-sample noise).
    ``determined_frames`` env draws are rendered and tokenised: the cells equal in all of them are
    the determined cells, and a model sample is ``determined_exact`` when it is right on all of them.
    """
    env_samples = int(env_samples or samples)
    tv, floor, count_right, determined_exact, determined_cells = [], [], [], [], []
    for p, probe in enumerate(probes):
        frame = probe.env.frame() if hasattr(probe.env, "frame") else probe.env.render()
        tokens = world_model.encode(frame[None])[0].cpu().numpy()  # (h, w)
        ids = {int(tokens[y, x]) for x, y in probe.obstacles}
        drawn = model_next_tokens(world_model, tokens, probe.action, samples, sampling, seed=seed * 100003 + p)
        model_cells = cells_of_token(drawn, ids)
        env_cells, env_frames = env_next_samples(probe.env, probe.action, env_samples, seed=seed * 100003 + p,
                                                 obstacle_type=probe.obstacle_type, frames=determined_frames)
        tv.append(obstacle_tv(probe.obstacles, model_cells, env_cells))
        if p < floor_probes:
            again, _ = env_next_samples(probe.env, probe.action, env_samples, seed=seed * 100003 + p + 7919 * 10**6,
                                        obstacle_type=probe.obstacle_type)
            floor.append(obstacle_tv(probe.obstacles, again, env_cells))
        count_right.append(float(np.mean([len(c) == len(probe.obstacles) for c in model_cells])))
        if env_frames is not None:
            real = world_model.encode(env_frames).cpu().numpy()  # (F, h, w)
            fixed = (real == real[:1]).all(axis=0)  # (h, w): the cells no env draw changed
            determined_cells.append(int(fixed.sum()))
            determined_exact.append(float((drawn[:, fixed] == real[0][fixed]).all(axis=1).mean()))
    return StochasticResult(tv=np.asarray(tv), floor=np.asarray(floor), count_right=np.asarray(count_right),
                            determined_exact=np.asarray(determined_exact), determined_cells=np.asarray(determined_cells))
