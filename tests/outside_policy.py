"""Outside policies for tests/test_byop.py, written the way a user would: no sandbox imports.

Each records what it was given in ``RECEIVED[<its name>]`` so a test can check that the adapter
handed it exactly the input it declared, in the real env and in imagination.
"""

import numpy as np

RECEIVED: dict = {}


def _record(name, observation):
    RECEIVED.setdefault(name, []).append(observation)


class FramePolicy:
    """Reads RGB frames; turns right, then moves forward."""

    inputs = "frames"

    def reset(self, batch_size, seed=None):
        self.rng = np.random.default_rng(seed)
        _record("reset", (batch_size, seed))

    def act(self, frames):
        _record("frames", frames)
        return self.rng.integers(0, 3, size=len(frames))


class StatePolicy:
    observation = "states"  # the alias of `inputs`

    def act(self, states):
        _record("states", states)
        return np.full(len(states), 2)


class NativePolicy:
    inputs = ("minigrid",)

    def act(self, obs):
        _record("minigrid", obs)
        return np.zeros(len(obs["direction"]), dtype=np.int64)


class TokenPolicy:
    inputs = "tokens"

    def act(self, tokens):
        _record("tokens", tokens)
        return [1] * len(tokens)  # a list of ints will do


def make_agent():
    """A factory: returns the object that acts."""
    return StatePolicy()


def forward_everywhere(frames):
    """A plain callable on frames (the default input)."""
    return np.full(len(frames), 2)


forward_everywhere.inputs = "frames"


class OutOfRange:
    inputs = "states"

    def act(self, states):
        return np.full(len(states), 7)


class WrongShape:
    inputs = "states"

    def act(self, states):
        return np.zeros((len(states), 1), dtype=np.int64)


class FloatActions:
    inputs = "states"

    def act(self, states):
        return np.zeros(len(states), dtype=np.float32)


class BadDeclaration:
    inputs = "pixels"

    def act(self, obs):
        return np.zeros(len(obs), dtype=np.int64)


NOT_A_POLICY = 3
