"""Stochastic worlds: sequential sampling draws the joint next frame, seeded; the env-side sampler
reseeds its copies; the obstacle-move measure (worldmodel/stochastic.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worldmodel.dynamics import DynamicsModel, DynamicsModelConfig
from worldmodel.imagine import SamplingConfig, WorldModel
from worldmodel.stochastic import env_next_samples, match_obstacles, obstacle_tv, total_variation

EMPTY, BALL, WALL = 0, 1, 2
SIDE = 6  # token grid SIDE x SIDE


def config(**overrides) -> DynamicsModelConfig:
    values = dict(vocab_size=3, grid_height=SIDE, grid_width=SIDE, state_width=SIDE, state_height=SIDE, num_actions=3,
                  dim=16, heads=2, block="conv", encoder_layers=0, decoder_layers=1, mlp_ratio=2, memory_dim=16,
                  summary_channels=2, state_hidden=16, action_dropout=0.0, memory="frame", decoder_context="global",
                  presence=False, refine_fraction=0.3, change_weight=0.0, event_weight=1.0)
    values.update(overrides)
    return DynamicsModelConfig(**values)


class OneBallPerRegion:
    """Exact conditionals of a known joint: in each region (a list of cells) exactly one ball,
    uniformly placed; every other cell certainly empty. Replaces DynamicsModel.predict_logits."""

    def __init__(self, regions: list[list[int]]):
        self.regions = regions
        self.calls = 0

    def __call__(self, cache, actions, next_tokens=None, guidance=1.0):
        self.calls += 1
        rows = actions.shape[0]
        known = torch.full((rows, SIDE * SIDE), -1) if next_tokens is None else next_tokens.clone()
        probs = torch.zeros(rows, SIDE * SIDE, 3)
        probs[..., EMPTY] = 1.0
        for region in self.regions:
            cells = torch.tensor(region)
            values = known[:, cells]  # (R, C); the mask token (3) or -1 where unknown
            unknown = (values != EMPTY) & (values != BALL)
            placed = (values == BALL).any(dim=1, keepdim=True)
            ball = torch.where(placed | ~unknown, 0.0, 1.0 / unknown.sum(dim=1, keepdim=True).clamp_min(1))
            probs[:, cells, BALL] = ball
            probs[:, cells, EMPTY] = 1.0 - ball
        return torch.log(probs.clamp_min(1e-12)), torch.zeros(rows, 3)


def fake_model(regions: list[list[int]], **overrides) -> tuple[DynamicsModel, OneBallPerRegion]:
    torch.manual_seed(0)
    model = DynamicsModel(config(**overrides)).eval()
    conditionals = OneBallPerRegion(regions)
    model.predict_logits = conditionals  # type: ignore[method-assign]
    return model, conditionals


def draw(model: DynamicsModel, samples: int, seed: int, order: str, temperature: float = 1.0) -> torch.Tensor:
    """samples next frames (samples, N) from an all-empty frame."""
    tokens = torch.zeros(samples, 1, SIDE, SIDE, dtype=torch.long)
    cache, _ = model.start(tokens, torch.zeros(samples, 0, dtype=torch.long))
    generator = torch.Generator().manual_seed(seed)
    out = model.predict(cache, torch.zeros(samples, dtype=torch.long), temperature=temperature, generator=generator,
                        order=order)
    return out.tokens.reshape(samples, -1)


def cell(x: int, y: int) -> int:
    return y * SIDE + x


def test_sequential_sampling_draws_one_ball_uniformly_where_parallel_does_not():
    region = [cell(1, 1), cell(2, 1), cell(3, 1), cell(1, 2), cell(3, 2)]
    model, _ = fake_model([region], block="attention")  # the region spans more than one conv block reaches
    samples = 4000
    frames = draw(model, samples, seed=1, order="sequential")
    balls = (frames == BALL)
    assert (balls.sum(dim=1) == 1).all()  # exactly one ball, every time
    assert not balls[:, [i for i in range(SIDE * SIDE) if i not in region]].any()
    share = balls[:, region].float().mean(dim=0).numpy()
    # TV to uniform: about 0.013 expected from 4000 samples, 0.04 allowed.
    assert 0.5 * np.abs(share - 1 / len(region)).sum() < 0.04
    # Each token on its own (the old way) gets the marginals right but the count wrong: P(one ball) = 0.41.
    independent = (draw(model, samples, seed=1, order="parallel") == BALL).sum(dim=1)
    assert (independent == 1).float().mean() < 0.6


def test_far_apart_choices_share_a_pass_and_stay_jointly_uniform():
    left, right = [cell(0, 0), cell(0, 1)], [cell(4, 0), cell(4, 1)]  # 4 columns apart
    model, conditionals = fake_model([left, right], block="conv", decoder_layers=1)
    frames = draw(model, 4000, seed=2, order="sequential")
    assert conditionals.calls == 2  # both regions drawn in the first pass, the rest sure in the second
    combos = (frames[:, left[0]] == BALL).long() * 2 + (frames[:, right[0]] == BALL).long()
    share = np.bincount(combos.numpy(), minlength=4) / len(combos)
    assert ((frames == BALL).sum(dim=1) == 2).all()
    assert 0.5 * np.abs(share - 0.25).sum() < 0.04
    # Attention blocks see everything: one choice per pass.
    model, conditionals = fake_model([left, right], block="attention")
    draw(model, 64, seed=2, order="sequential")
    assert conditionals.calls == 3


class MovingBalls:
    """Marginals of balls that each move to a uniform one of their free neighbours (the cells of
    ``candidates[i]``); the balls' own cells certainly empty. Replaces DynamicsModel.predict_logits."""

    def __init__(self, candidates: list[list[int]]):
        self.candidates = candidates

    def __call__(self, cache, actions, next_tokens=None, guidance=1.0):
        rows = actions.shape[0]
        probs = torch.zeros(rows, SIDE * SIDE, 3)
        ball = torch.zeros(SIDE * SIDE)
        for cells in self.candidates:
            ball[cells] += 1.0 / len(cells)
        probs[..., BALL] = ball.clamp_max(1.0)
        probs[..., EMPTY] = 1.0 - probs[..., BALL]
        return torch.log(probs.clamp_min(1e-12)), torch.zeros(rows, 3)


def test_object_sampling_conserves_moving_balls_from_marginals_alone():
    torch.manual_seed(0)
    model = DynamicsModel(config()).eval()
    # Balls at (2, 2) and (3, 2); their free neighbours overlap in (2, 1)..(3, 3).
    first = [cell(1, 1), cell(2, 1), cell(3, 1), cell(1, 3), cell(2, 3), cell(3, 3)]
    second = [cell(2, 1), cell(3, 1), cell(4, 1), cell(2, 3), cell(3, 3), cell(4, 3)]
    model.predict_logits = MovingBalls([first, second])  # type: ignore[method-assign]
    samples = 3000
    tokens = torch.zeros(samples, 1, SIDE, SIDE, dtype=torch.long)
    tokens[:, 0, 2, 2] = tokens[:, 0, 2, 3] = BALL
    cache, _ = model.start(tokens, torch.zeros(samples, 0, dtype=torch.long))
    frames = model.predict(cache, torch.zeros(samples, dtype=torch.long), temperature=1.0, order="objects",
                           generator=torch.Generator().manual_seed(4)).tokens.reshape(samples, -1)
    balls = frames == BALL
    assert (balls.sum(dim=1) == 2).all()  # two balls in, two out, never on one cell
    assert not balls[:, [cell(2, 2), cell(3, 2)]].any()
    # The first ball (position order) draws by the marginals: 1/6 on its own cells, 1/3 on shared ones,
    # so 0.1 on (1, 1) (the env: 1/6, the rule's known bias where neighbourhoods overlap); the
    # second then 0.2 * 0.1 + 0.8 * 0.125 = 0.12 on (4, 1). About 0.006 of noise from 3000 samples.
    assert abs(float(balls[:, cell(1, 1)].float().mean()) - 0.1) < 0.03
    assert abs(float(balls[:, cell(4, 1)].float().mean()) - 0.12) < 0.03
    independent = (draw_from(model, tokens, "parallel") == BALL).sum(dim=1)
    assert (independent == 2).float().mean() < 0.5


def draw_from(model: DynamicsModel, tokens: torch.Tensor, order: str) -> torch.Tensor:
    cache, _ = model.start(tokens, torch.zeros(len(tokens), 0, dtype=torch.long))
    return model.predict(cache, torch.zeros(len(tokens), dtype=torch.long), temperature=1.0, order=order,
                         generator=torch.Generator().manual_seed(5)).tokens.reshape(len(tokens), -1)


def test_sampling_undoes_the_change_weight_of_the_loss():
    """Trained with changed targets weighted 1 + c, the loss's minimiser is q * weight renormalised:
    sampling must draw from q again."""
    model = DynamicsModel(config(change_weight=10.0)).eval()
    q = torch.tensor([0.75, 0.25, 0.0])  # stay empty 0.75, become a ball 0.25
    weighted = q * torch.tensor([1.0, 11.0, 11.0])
    logits = torch.log((weighted / weighted.sum()).clamp_min(1e-12)).expand(1, SIDE * SIDE, 3)
    current = torch.zeros(1, SIDE * SIDE, dtype=torch.long)  # every cell empty now
    assert torch.softmax(logits, -1)[0, 0, BALL] == pytest.approx(0.786, abs=1e-3)  # what training leaves
    recovered = torch.softmax(model._unweighted_logits(logits, current), -1)
    assert torch.allclose(recovered, q.expand_as(recovered), atol=1e-5)


class NullTokenizer:
    vocab_size, patch_size, identity = 3, 8, "null"

    def encode(self, frames):
        raise NotImplementedError("not needed here")

    def decode(self, tokens):
        raise NotImplementedError("not needed here")


def test_seeded_sampling_is_reproducible():
    model, _ = fake_model([[cell(1, 1), cell(2, 1), cell(3, 1), cell(2, 2)]], block="attention")
    world = WorldModel(NullTokenizer(), model, SamplingConfig(temperature=1.0, order="sequential"))
    start = torch.zeros(64, SIDE, SIDE, dtype=torch.long)

    def rollout(seed: int) -> torch.Tensor:
        world.seed(seed)
        world.reset(start)
        return torch.stack([world.step(torch.zeros(64, dtype=torch.long)).tokens for _ in range(2)])

    first = rollout(7)
    assert torch.equal(first, rollout(7))
    assert not torch.equal(first, rollout(8))


def test_deterministic_frames_do_not_change_with_the_sampling_order():
    torch.manual_seed(0)
    model = DynamicsModel(config(vocab_size=8, output_tokens=[], static_cells=[0, 1, 2])).eval()
    tokens = torch.randint(0, 8, (16, 1, SIDE, SIDE))
    cache, _ = model.start(tokens, torch.zeros(16, 0, dtype=torch.long))
    actions = torch.randint(0, 3, (16,))
    greedy = model.predict(cache, actions).tokens
    assert torch.equal(greedy, model.predict(cache, actions, order="sequential").tokens)
    with torch.no_grad():
        model.copy_bias.fill_(40.0)  # every cell sure: sequential sampling is the greedy frame, in one pass
    calls = []
    original = model.predict_logits
    model.predict_logits = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    sampled = model.predict(cache, actions, temperature=1.0, order="sequential",
                            generator=torch.Generator().manual_seed(0)).tokens
    assert len(calls) == 1
    assert torch.equal(sampled, tokens[:, 0])
    with pytest.raises(ValueError, match="sampling order"):
        model.predict(cache, actions, order="sideways")


# ---------------------------------------------------------------------------------------------
# The env's side and the measure
# ---------------------------------------------------------------------------------------------


def one_ball_env():
    """Dynamic-Obstacles-6x6 with one ball at (2, 1) beside the agent at (1, 1)."""
    from minigrid.core.world_object import Ball

    from envs.make import make_env

    env = make_env("MiniGrid-Dynamic-Obstacles-6x6-v0", seed=0)
    base = env.unwrapped
    for obstacle in base.obstacles:
        base.grid.set(*obstacle.cur_pos, None)
    ball = Ball()
    base.grid.set(2, 1, ball)
    ball.cur_pos = ball.init_pos = (2, 1)
    base.obstacles = [ball]
    base.agent_pos, base.agent_dir = (1, 1), 1  # facing down: the ball is not in front
    return env


def test_env_copies_are_reseeded_and_move_the_ball_uniformly_over_its_free_neighbours():
    env = one_ball_env()
    free = {(3, 1), (1, 2), (2, 2), (3, 2)}  # the 3x3 around (2, 1) without walls, the agent and the ball itself
    samples, _ = env_next_samples(env, action=0, samples=3000, seed=3)
    cells = [tuple(map(int, s[0])) for s in samples]
    assert set(cells) == free
    share = np.array([cells.count(c) for c in sorted(free)]) / len(cells)
    assert 0.5 * np.abs(share - 0.25).sum() < 0.04  # ~0.012 expected
    again, _ = env_next_samples(env, action=0, samples=50, seed=3)
    assert again == samples[:50]  # seeded
    assert env.unwrapped.obstacles[0].cur_pos == (2, 1)  # the env itself did not move


def test_obstacles_are_matched_by_least_displacement_and_compared_by_total_variation():
    before = [(1, 1), (4, 4)]
    assert match_obstacles(before, [(4, 3), (2, 1)]) == [(2, 1), (4, 3)]
    assert match_obstacles(before, [(3, 4)]) == [(-1, -1), (3, 4)]  # a lost ball is "missing"
    assert total_variation({"a": 0.5, "b": 0.5}, {"a": 1.0}) == pytest.approx(0.5)
    same = [[(2, 1), (4, 3)], [(1, 2), (3, 4)]]
    assert obstacle_tv(before, same, same) == 0.0
    assert obstacle_tv(before, [[(2, 1), (4, 3)]], [[(1, 2), (3, 4)]]) == pytest.approx(1.0)
