"""The dream envs pay what the real env pays: on an exact model, an episode's dream return equals
the real one to the digit (MiniGrid pays 1 - 0.9 t / T for a success at step t; a reward head,
which cannot see t, pays its average)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from envs.make import make_env
from envs.oracle import plan
from envs.state import state_from_env
from worldmodel.imagine import DreamEnv, DreamVectorEnv, step_aware_reward

ENV_ID = "MiniGrid-DoorKey-5x5-v0"
HEAD_AVERAGE = 0.487  # what a reward head that cannot see the step count pays for every success


class ExactModel:
    """A world model that is the real env: row i steps its own env, reset from the seed its start
    token holds. Its reward head pays ``HEAD_AVERAGE`` for every success, whatever the step."""

    token_shape = (1, 1)
    num_actions = 7
    config = SimpleNamespace(vocab_size=2**31 - 1)
    tokenizer = SimpleNamespace(patch_size=1)

    def __init__(self):
        self.envs, self.tokens, self.state = [], None, None

    def seed(self, seed: int) -> None:
        pass

    def _reset_row(self, i: int, seed: int) -> np.ndarray:
        env = make_env(ENV_ID)
        _, info = env.reset(seed=int(seed))
        self.envs[i] = env
        return info["state"]

    def reset(self, tokens) -> torch.Tensor:
        tokens = torch.as_tensor(np.asarray(tokens)).reshape(-1, 1, 1)
        self.envs = [None] * len(tokens)
        self.state = torch.as_tensor(np.stack([self._reset_row(i, int(t)) for i, t in enumerate(tokens[:, 0, 0])]))
        self.tokens = tokens.long()
        return self.tokens

    def reset_rows(self, rows, tokens) -> None:
        for i, token in zip(np.flatnonzero(rows), np.asarray(tokens).reshape(-1)):
            self.state[i] = torch.as_tensor(self._reset_row(int(i), int(token)))
            self.tokens[i] = int(token)

    def step(self, actions):
        rewards, terminated, states = [], [], []
        for env, action in zip(self.envs, np.asarray(actions).reshape(-1)):
            _, reward, term, _, info = env.step(int(action))
            rewards.append(HEAD_AVERAGE if reward > 0 else 0.0)
            terminated.append(term)
            states.append(info["state"])
        self.state = torch.as_tensor(np.stack(states))
        return SimpleNamespace(tokens=self.tokens, reward=torch.tensor(rewards), terminated=torch.tensor(terminated))

    def decode(self):
        return np.zeros((len(self.envs), 1, 1, 3), dtype=np.uint8)


class Seeds:
    """Start "tokens" that are env seeds."""

    def __init__(self, seeds):
        self.seeds, self.next = list(seeds), 0

    def sample(self, rng, n):
        picked = [self.seeds[(self.next + i) % len(self.seeds)] for i in range(n)]
        self.next += n
        return np.asarray(picked, dtype=np.int64).reshape(n, 1, 1), None


def real_episode(seed: int, wander: int) -> tuple[list[int], float, int]:
    """``wander`` turns, then the oracle's plan: the actions and the real return and limit."""
    env = make_env(ENV_ID)
    env.reset(seed=seed)
    actions = [0] * wander
    for action in actions:
        env.step(action)
    actions += plan(state_from_env(env))
    env = make_env(ENV_ID)
    env.reset(seed=seed)
    total = 0.0
    for action in actions:
        _, reward, terminated, truncated, _ = env.step(action)
        total += reward
        if terminated or truncated:
            break
    assert terminated and total > 0
    return actions, total, int(env.unwrapped.max_steps)


@pytest.mark.parametrize("wander", [0, 7])
def test_dream_env_pays_the_real_return_on_an_exact_model(wander):
    actions, real_return, max_steps = real_episode(seed=3, wander=wander)
    for reward, expected in (("step_aware", real_return), ("model", HEAD_AVERAGE)):
        env = DreamEnv(ExactModel(), Seeds([3]), max_episode_steps=max_steps, reward=reward)
        env.reset(seed=0)
        total, done = 0.0, False
        for action in actions:
            assert not done
            _, r, terminated, truncated, _ = env.step(action)
            total += r
            done = terminated or truncated
        assert done
        if reward == "step_aware":
            assert total == expected  # to the digit
        else:  # the head's float32 value: the dream pays another objective than the real env
            assert total == pytest.approx(expected, abs=1e-6) and abs(total - real_return) > 0.3


def test_dream_vector_env_pays_the_real_return_per_row_and_after_autoreset():
    episodes = [real_episode(seed, wander) for seed, wander in ((3, 0), (5, 4))]
    env = DreamVectorEnv(ExactModel(), Seeds([3, 5]), num_envs=2, max_episode_steps=episodes[0][2])
    env.reset(seed=0)
    length = max(len(a) for a, _, _ in episodes)
    totals, ended = np.zeros(2), np.zeros(2, dtype=bool)
    for t in range(length):
        actions = [a[t] if t < len(a) else 6 for a, _, _ in episodes]
        _, reward, terminated, truncated, _ = env.step(actions)
        totals += np.where(ended, 0.0, reward)
        ended |= terminated | truncated
    assert ended.all() and totals.tolist() == [r for _, r, _ in episodes]


def test_step_aware_rule_keeps_penalties_and_refuses_unknown_modes():
    assert step_aware_reward(np.array([0.5, 0.0, -1.0]), 10, 100).tolist() == [1 - 0.9 * (10 / 100), 0.0, -1.0]
    with pytest.raises(ValueError, match="dream env reward must be one of"):
        DreamEnv(ExactModel(), Seeds([3]), reward="average")
