"""The symbolic state codec round-trips; its text form is stable."""

import numpy as np
import pytest

from envs import StateCodec, make_env
from envs.state import SymbolicState


@pytest.mark.parametrize("env_id", ["DoorKey-6x6", "FourRooms", "LavaGapS5", "MultiRoom-N2-S4"])
def test_codec_round_trip_along_an_episode(env_id):
    env = make_env(env_id)
    _, info = env.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(60):
        array = info["state"]
        state = env.codec.decode(array)
        assert np.array_equal(env.codec.encode(state), array)
        live = env.symbolic_state()
        assert state.agent_pos == live.agent_pos and state.agent_dir == live.agent_dir
        assert state.carrying == live.carrying and np.array_equal(state.grid, live.grid)
        _, _, terminated, truncated, info = env.step(int(rng.integers(6)))
        if terminated or truncated:
            _, info = env.reset(seed=4)


def test_carrying_is_encoded():
    env = make_env("DoorKey-5x5")
    _, info = env.reset(seed=0)
    from envs.oracle import Oracle

    oracle = Oracle(env.codec)
    for _ in range(30):  # follow the oracle until it picks the key up
        _, _, _, _, info = env.step(oracle.action(info["state"]))
        state = env.codec.decode(info["state"])
        if state.carrying[0] == 5:
            assert "carrying yellow key" in state.text()
            assert not state.objects(5)  # the key left the floor
            return
    pytest.fail("oracle never picked the key up")


def test_text_form_is_stable():
    env = make_env("DoorKey-6x6")
    _, info = env.reset(seed=3)
    expected = "\n".join([
        "agent at (1, 3) facing south, carrying nothing",
        "goal at (4, 4)",
        "yellow key at (1, 2)",
        "yellow door at (3, 1) locked",
        "grid:",
        "######",
        "#..D.#",
        "#k.#.#",
        "#v.#.#",
        "#..#G#",
        "######",
    ])
    assert env.codec.decode(info["state"]).text() == expected


def test_codec_rejects_wrong_sizes():
    codec = StateCodec(5, 5)
    with pytest.raises(ValueError, match="expected \\(81,\\)"):
        codec.decode(np.zeros(80, dtype=np.uint8))
    state = SymbolicState(np.ones((6, 6, 3), np.uint8), (1, 1), 0, (1, 0, 0))
    with pytest.raises(ValueError, match="codec was built for"):
        codec.encode(state)
    assert StateCodec.for_array_size(81).width == 5


def test_non_square_grid_round_trip_and_text():
    """KeyCorridorS3R1 is 7 wide and 3 high: the codec, its text and its reader keep the two apart."""
    env = make_env("KeyCorridorS3R1")
    _, info = env.reset(seed=0)
    assert (env.codec.width, env.codec.height) == (7, 3) and info["state"].shape == (7 * 3 * 3 + 6,)
    rng = np.random.default_rng(0)
    for _ in range(60):
        state = env.codec.decode(info["state"])
        live = env.symbolic_state()
        assert np.array_equal(env.codec.encode(state), info["state"])
        assert state.grid.shape == (7, 3, 3) and np.array_equal(state.grid, live.grid)
        assert state.agent_pos == live.agent_pos and state.carrying == live.carrying
        # the grid's cell (x, y) is the env's cell (x, y): width runs along x
        assert all(state.grid[x, y, 0] == (env.unwrapped.grid.get(x, y).encode()[0] if env.unwrapped.grid.get(x, y)
                                          else 1) for x in range(7) for y in range(3))
        _, _, terminated, truncated, info = env.step(int(rng.integers(6)))
        if terminated or truncated:
            _, info = env.reset(seed=1)
    _, info = env.reset(seed=0)
    assert env.codec.decode(info["state"]).text() == "\n".join([
        "agent at (3, 1) facing south, carrying nothing",
        "yellow key at (1, 1)",
        "purple ball at (5, 1)",
        "blue door at (2, 1) closed",
        "yellow door at (4, 1) locked",
        "grid:",
        "#######",
        "#kdvDo#",
        "#######",
    ])


def test_non_square_codec_from_a_card():
    with pytest.raises(ValueError, match="needs its width"):
        StateCodec.for_array_size(69)  # 21 cells: 7 x 3 (or 3 x 7), no square
    codec = StateCodec.for_array_size(69, width=7)
    assert (codec.width, codec.height) == (7, 3)
    codec = StateCodec.for_card({"grid_size": [7, 3], "state_size": 69})
    assert (codec.width, codec.height) == (7, 3)
    assert (StateCodec.for_card({"grid_size": [3, 7], "state_size": 69}).width) == 3  # the card decides
    assert StateCodec.for_card({"state_size": 81}).width == 5  # an old card without grid_size: square
    with pytest.raises(ValueError, match="grid_size \\[7, 3\\] gives states of length 69"):
        StateCodec.for_card({"grid_size": [7, 3]}, state_size=81)
