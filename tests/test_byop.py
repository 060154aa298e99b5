"""Bring your own policy: MiniGrid's native observation from the symbolic state, outside policies
(``module:attr``, TorchScript, stable-baselines3) in the real env and in imagination, and their errors."""

from __future__ import annotations

import numpy as np
import pytest


# ---------------------------------------------------------------------------------------------
# The native observation
# ---------------------------------------------------------------------------------------------


def _real_states(env_id: str, episodes: int, epsilon: float):
    """(state, MiniGrid's own gen_obs()) pairs along epsilon-oracle episodes: doors get opened, keys
    carried, and walls and closed doors hide cells on the way."""
    import gymnasium as gym
    from minigrid.minigrid_env import MiniGridEnv

    from envs.make import normalize_env_id
    from envs.policies import parse_policy_mix
    from envs.state import StateCodec, state_from_env

    env = gym.make(normalize_env_id(env_id), disable_env_checker=True)
    base = env.unwrapped
    codec = StateCodec(base.width, base.height)
    behaviour = parse_policy_mix(f"epsilon_oracle@{epsilon}")[0].build(7, codec)
    for episode in range(episodes):
        env.reset(seed=episode)
        behaviour.reset(np.random.default_rng(episode))
        done = False
        while not done:
            state = state_from_env(env)
            yield state, MiniGridEnv.gen_obs(base)
            _, _, terminated, truncated, _ = env.step(behaviour.act(codec.encode(state)))
            done = terminated or truncated
    env.close()


@pytest.mark.parametrize("env_id", ["DoorKey-5x5", "DoorKey-6x6"])
def test_native_observation_equals_minigrids_own(env_id):
    from envs.native_obs import native_observation, native_observations
    from envs.state import DOOR, DOOR_OPEN, KEY, StateCodec

    pairs = list(_real_states(env_id, episodes=60, epsilon=0.3))
    seen = {"door_closed_in_view": 0, "door_open_in_view": 0, "carrying_key": 0, "hidden_cells": 0}
    for state, reference in pairs:
        got = native_observation(state)
        assert got["direction"] == reference["direction"]
        np.testing.assert_array_equal(got["image"], reference["image"])
        image = reference["image"]
        doors = image[..., 0] == DOOR
        seen["door_closed_in_view"] += bool((doors & (image[..., 2] != DOOR_OPEN)).any())
        seen["door_open_in_view"] += bool((doors & (image[..., 2] == DOOR_OPEN)).any())
        seen["carrying_key"] += state.carrying[0] == KEY
        seen["hidden_cells"] += bool((image[..., 0] == 0).any())
    # The cases that matter were met, many times: occlusion by walls and closed doors, seeing
    # through an open door, the carried key at the agent's cell.
    assert len(pairs) > 800 and min(seen.values()) > 20, seen
    # The batched builder is the same function.
    codec = StateCodec(pairs[0][0].width, pairs[0][0].height)
    batch = native_observations(np.stack([codec.encode(s) for s, _ in pairs]).astype(np.int64), codec)
    np.testing.assert_array_equal(batch["image"], np.stack([r["image"] for _, r in pairs]))
    np.testing.assert_array_equal(batch["direction"], [r["direction"] for _, r in pairs])


def test_native_observation_survives_impossible_states():
    """The state head may predict an agent off the grid, a direction past 3, unknown objects."""
    from envs.native_obs import native_observations
    from envs.state import StateCodec

    codec = StateCodec(5, 5)
    states = np.random.default_rng(0).integers(0, 256, size=(64, codec.size))
    obs = native_observations(states, codec)
    assert obs["image"].shape == (64, 7, 7, 3) and obs["image"].dtype == np.uint8
    assert obs["direction"].min() >= 0 and obs["direction"].max() <= 3
