"""Contract tests for make_env: gymnasium's checker, seeding, spaces, clear errors."""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs import make_env, normalize_env_id

ENV_IDS = [
    "MiniGrid-Empty-5x5-v0", "MiniGrid-Empty-8x8-v0", "MiniGrid-DoorKey-5x5-v0", "MiniGrid-DoorKey-6x6-v0",
    "MiniGrid-DoorKey-8x8-v0", "MiniGrid-FourRooms-v0", "MiniGrid-LavaGapS5-v0", "MiniGrid-LavaGapS7-v0",
    "MiniGrid-MultiRoom-N2-S4-v0",
]


@pytest.mark.parametrize("obs", ["full", "partial"])
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_check_env_and_spaces(env_id, obs):
    env = make_env(env_id, obs=obs)
    check_env(env, skip_render_check=True)
    frame, info = env.reset(seed=7)
    assert env.observation_space.contains(frame)
    assert frame.dtype == np.uint8 and frame.shape[-1] == 3
    base = env.unwrapped
    if obs == "full":
        assert frame.shape == (base.height * 8, base.width * 8, 3)
    else:
        assert frame.shape == (base.agent_view_size * 8,) * 2 + (3,)
    assert info["state"].shape == (env.codec.size,) and info["state"].dtype == np.uint8
    rng = np.random.default_rng(0)
    for _ in range(20):
        frame, reward, terminated, truncated, info = env.step(int(rng.integers(env.action_space.n)))
        assert env.observation_space.contains(frame)
        assert "state" in info
        if terminated or truncated:
            break


@pytest.mark.parametrize("obs", ["full", "partial"])
def test_same_seed_same_episode(obs):
    def rollout(seed):
        env = make_env("DoorKey-6x6", obs=obs)
        frame, info = env.reset(seed=seed)
        frames, states = [frame], [info["state"]]
        rng = np.random.default_rng(123)
        for _ in range(40):
            frame, _, terminated, truncated, info = env.step(int(rng.integers(7)))
            frames.append(frame)
            states.append(info["state"])
            if terminated or truncated:
                break
        return np.stack(frames), np.stack(states)

    frames_a, states_a = rollout(5)
    frames_b, states_b = rollout(5)
    frames_c, _ = rollout(6)
    assert np.array_equal(frames_a, frames_b) and np.array_equal(states_a, states_b)
    assert not np.array_equal(frames_a[0], frames_c[0])  # another seed, another layout


def test_full_view_frame_is_a_function_of_the_state():
    """The full view has no field-of-view highlight: equal states render equal frames."""
    env = make_env("Empty-5x5")
    frame_a, info_a = env.reset(seed=0)
    env.step(0)  # left
    env.step(1)  # right: back to the same state, different view history
    frame_b = env.frame()
    assert np.array_equal(info_a["state"], env.codec.encode(env.symbolic_state()))
    assert np.array_equal(frame_a, frame_b)


def test_short_ids_and_bad_ids():
    assert normalize_env_id("DoorKey-5x5") == "MiniGrid-DoorKey-5x5-v0"
    with pytest.raises(ValueError, match="unknown env id 'DoorKey-7x7'.*DoorKey"):
        make_env("DoorKey-7x7")
    with pytest.raises(ValueError, match="not a MiniGrid env"):
        make_env("CartPole-v1")
    with pytest.raises(ValueError, match="observation mode 'egocentric'"):
        make_env("DoorKey-5x5", obs="egocentric")


def test_max_steps_override_truncates():
    env = make_env("DoorKey-5x5", max_steps=5)
    env.reset(seed=0)
    truncated = False
    for _ in range(5):
        _, _, terminated, truncated, _ = env.step(0)
    assert truncated and not terminated


@pytest.mark.parametrize("env_id", ["DoorKey-5x5", "DoorKey-6x6"])
def test_env_from_state_renders_the_same_frame(env_id):
    """Every state along oracle and random episodes: the rebuilt env's frames are byte-identical."""
    from envs.make import env_from_state
    from envs.policies import EpsilonOraclePolicy

    env = make_env(env_id)
    env_partial = make_env(env_id, obs="partial")
    policy = EpsilonOraclePolicy(7, env.codec, epsilon=0.3)
    checked, kinds = 0, set()
    for seed in range(6):
        policy.reset(np.random.default_rng(seed))
        frame, info = env.reset(seed=seed)
        partial, _ = env_partial.reset(seed=seed)
        while True:
            rebuilt = env_from_state(env_id, info["state"], seed=100 + seed)  # another layout, overwritten
            assert np.array_equal(rebuilt.frame(), frame)
            assert np.array_equal(rebuilt.codec.encode(rebuilt.symbolic_state()), info["state"])
            rebuilt_partial = env_from_state(env_id, info["state"], obs="partial", seed=100 + seed)
            assert np.array_equal(rebuilt_partial.frame(), partial)
            state = env.codec.decode(info["state"])
            kinds.add((state.carrying[0], tuple(s for *_, s in state.objects(4))))
            checked += 1
            action = policy.act(info["state"])
            frame, _, terminated, truncated, info = env.step(action)
            partial, *_ = env_partial.step(action)
            if terminated or truncated:
                break
    assert checked > 50
    assert (5, (0,)) in kinds and (1, (2,)) in kinds  # key in hand with the door open; empty hands, door locked


def test_env_from_state_steps_like_the_original():
    """The rebuilt env goes on as the original does (same transitions from the same state), up to
    KeyCorridor's reward on picking up the mission's ball."""
    from envs.make import env_from_state
    from envs.oracle import task_for_env
    from envs.policies import EpsilonOraclePolicy

    for env_id in ("DoorKey-6x6", "KeyCorridorS3R1"):
        env = make_env(env_id)
        _, info = env.reset(seed=1)
        policy = EpsilonOraclePolicy(7, env.codec, epsilon=0.2, task=task_for_env(env))
        policy.reset(np.random.default_rng(0))
        rewarded = False
        for _ in range(200):
            action = policy.act(info["state"])
            rebuilt = env_from_state(env_id, info["state"], seed=1)  # seed 1: the same mission
            frame, reward, terminated, _, info = env.step(action)
            rebuilt_frame, rebuilt_reward, rebuilt_terminated, _, rebuilt_info = rebuilt.step(action)
            assert np.array_equal(rebuilt_frame, frame) and np.array_equal(rebuilt_info["state"], info["state"])
            assert terminated == rebuilt_terminated and (reward > 0) == (rebuilt_reward > 0)
            if terminated:
                rewarded = reward > 0
                break
        assert rewarded, f"{env_id}: the episode never reached its reward"


def test_env_from_state_moves_dynamic_obstacles_balls():
    """Dynamic-Obstacles moves the balls it lists: the rebuilt env lists the balls of the state."""
    from envs.make import env_from_state

    env = make_env("Dynamic-Obstacles-6x6")
    _, info = env.reset(seed=3)
    rebuilt = env_from_state("Dynamic-Obstacles-6x6", info["state"], seed=4)
    assert np.array_equal(rebuilt.frame(), env.frame())
    balls = lambda e: sorted(tuple(o.cur_pos) for o in e.unwrapped.obstacles)  # noqa: E731
    assert balls(rebuilt) == balls(env)
    before = balls(rebuilt)
    rebuilt.step(0)  # turn left: the balls move all the same
    assert balls(rebuilt) != before
    assert sorted((x, y) for x, y, *_ in rebuilt.symbolic_state().objects(6)) == balls(rebuilt)  # 6: ball
