"""Behaviour policies and the policy-mix grammar."""

import numpy as np
import pytest

from envs import make_env
from envs.oracle import Oracle
from envs.policies import EpsilonOraclePolicy, StickyRandomPolicy, parse_policy_mix


def test_parse_policy_mix():
    specs = parse_policy_mix("random:1, epsilon_oracle@0.25:2,sticky_random:1")
    assert [s.label for s in specs] == ["random", "epsilon_oracle@0.25", "sticky_random@0.75"]
    assert np.isclose(sum(s.weight for s in specs), 1.0) and np.isclose(specs[1].weight, 0.5)
    assert parse_policy_mix("oracle")[0].weight == 1.0


@pytest.mark.parametrize("text,message", [
    ("randm:1", "unknown policy 'randm'"),
    ("random@0.3:1", "takes no @parameter"),
    ("random:-1", "must be positive"),
    ("random:x", "cannot read"),
    ("", "names no policy"),
])
def test_bad_policy_mix(text, message):
    with pytest.raises(ValueError, match=message):
        parse_policy_mix(text)


def test_sticky_random_repeats_more_than_uniform():
    policy = StickyRandomPolicy(7, repeat=0.8)
    policy.reset(np.random.default_rng(0))
    actions = np.array([policy.act(None) for _ in range(2000)])
    repeats = np.mean(actions[1:] == actions[:-1])
    assert 0.75 < repeats < 0.9  # 0.8 + 0.2 / 7 expected


def test_epsilon_zero_is_the_oracle_and_epsilon_one_ignores_it():
    env = make_env("DoorKey-5x5")
    _, info = env.reset(seed=0)
    greedy = EpsilonOraclePolicy(7, env.codec, epsilon=0.0)
    greedy.reset(np.random.default_rng(0))
    assert greedy.act(info["state"]) == Oracle(env.codec).action(info["state"])
    noisy = EpsilonOraclePolicy(7, env.codec, epsilon=1.0)
    noisy.reset(np.random.default_rng(0))
    assert len({noisy.act(info["state"]) for _ in range(50)}) > 3


@pytest.mark.parametrize("env_id", ["MiniGrid-KeyCorridorS3R1-v0", "MiniGrid-Dynamic-Obstacles-6x6-v0"])
def test_scripted_oracle_reads_its_envs_grid_actions_and_task(env_id):
    """A 7x3 grid, 3 actions, a pick-up mission: the evaluate stage's oracle policy wins there too."""
    from agents.policy import PolicyInput, make_policy
    from envs.make import make_env

    env = make_env(env_id)
    wins = 0
    for seed in range(5):
        policy = make_policy("oracle", env_id=env_id)
        policy.reset(1, seed=0)
        frame, info = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            action = int(policy.act(PolicyInput(states=info["state"][None]))[0])
            assert 0 <= action < env.action_space.n
            frame, reward, terminated, truncated, info = env.step(action)
            total, done = total + reward, terminated or truncated
        wins += total > 0
    assert wins == 5
