"""Behaviour policies for offline data: uniform random, sticky-random explorer, epsilon-oracle.

A behaviour policy acts in one env on the symbolic state array (``info["state"]``) with its own
generator, so every episode is a pure function of its seed. A *policy mix* is a config string:
``"random:0.5,epsilon_oracle@0.3:0.3,sticky_random@0.8:0.2"`` = name[@parameter]:weight, comma
separated; each episode draws one policy from the mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from envs.oracle import GOAL_TASK, Oracle, Task
from envs.state import StateCodec

# name -> (parameter meaning, default parameter)
POLICY_PARAMETERS = {
    "random": (None, None),
    "sticky_random": ("probability of repeating the previous action", 0.75),
    "epsilon_oracle": ("probability of a random action instead of the oracle's", 0.1),
    "oracle": (None, None),
}
# name -> (lowest, highest, highest allowed): the parameter's range, as the policy's constructor checks it
PARAMETER_RANGES = {"sticky_random": (0.0, 1.0, False), "epsilon_oracle": (0.0, 1.0, True)}


class BehaviourPolicy:
    """One env's policy. ``reset(rng)`` at every episode start, then ``act(state) -> action``."""

    name = "policy"

    def __init__(self, num_actions: int):
        self.num_actions = int(num_actions)
        self.rng = np.random.default_rng(0)

    def reset(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def act(self, state: np.ndarray) -> int:
        raise NotImplementedError("a behaviour policy maps a state array (S,) to an action index")


class RandomPolicy(BehaviourPolicy):
    """Uniform over all actions."""

    name = "random"

    def act(self, state: np.ndarray) -> int:
        return int(self.rng.integers(self.num_actions))


class StickyRandomPolicy(BehaviourPolicy):
    """Repeats its previous action with probability ``repeat``, else draws a new one uniformly.

    Runs of the same action carry it further than uniform random (straight corridors, full turns).
    """

    name = "sticky_random"

    def __init__(self, num_actions: int, repeat: float = 0.75):
        super().__init__(num_actions)
        if not 0.0 <= repeat < 1.0:
            raise ValueError(f"sticky_random: repeat probability must be in [0, 1), got {repeat}")
        self.repeat = float(repeat)
        self.previous: int | None = None

    def reset(self, rng: np.random.Generator) -> None:
        super().reset(rng)
        self.previous = None

    def act(self, state: np.ndarray) -> int:
        if self.previous is None or self.rng.random() >= self.repeat:
            self.previous = int(self.rng.integers(self.num_actions))
        return self.previous


class EpsilonOraclePolicy(BehaviourPolicy):
    """The BFS oracle's action, replaced by a uniform random one with probability ``epsilon``.

    ``task``: what the oracle plans for (:func:`envs.oracle.task_for_env`; default: reach the goal).
    """

    name = "epsilon_oracle"

    def __init__(self, num_actions: int, codec: StateCodec, epsilon: float = 0.1, task: Task = GOAL_TASK):
        super().__init__(num_actions)
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon_oracle: epsilon must be in [0, 1], got {epsilon}")
        self.epsilon = float(epsilon)
        self.oracle = Oracle(codec, task)

    def reset(self, rng: np.random.Generator) -> None:
        super().reset(rng)
        self.oracle.reset()

    def act(self, state: np.ndarray) -> int:
        # Draw the coin first so the random stream does not depend on the oracle's answer.
        explore = self.rng.random() < self.epsilon
        random_action = int(self.rng.integers(self.num_actions))
        if explore:
            return random_action
        action = self.oracle.action(state)
        return random_action if action is None else action


@dataclass(frozen=True)
class PolicySpec:
    """One entry of a policy mix."""

    name: str
    parameter: float | None
    weight: float

    @property
    def label(self) -> str:
        return self.name if self.parameter is None else f"{self.name}@{self.parameter:g}"

    def build(self, num_actions: int, codec: StateCodec, task: Task = GOAL_TASK) -> BehaviourPolicy:
        """The policy for one env; ``task`` is what an oracle-based policy plans for."""
        if self.name == "random":
            return RandomPolicy(num_actions)
        if self.name == "sticky_random":
            return StickyRandomPolicy(num_actions, repeat=self.parameter)  # type: ignore[arg-type]
        if self.name == "epsilon_oracle":
            return EpsilonOraclePolicy(num_actions, codec, epsilon=self.parameter, task=task)  # type: ignore[arg-type]
        if self.name == "oracle":
            return EpsilonOraclePolicy(num_actions, codec, epsilon=0.0, task=task)
        raise ValueError(f"unknown behaviour policy '{self.name}'")


def parse_policy_mix(text: str) -> list[PolicySpec]:
    """Parse ``"name[@parameter]:weight,..."``; weights are normalised to sum to one.

    >>> [s.label for s in parse_policy_mix("random:1,epsilon_oracle@0.2:1")]
    ['random', 'epsilon_oracle@0.2']
    """
    specs = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        head, sep, weight_text = item.rpartition(":")
        if not sep:
            head, weight_text = item, "1"
        name, at, parameter_text = head.partition("@")
        name = name.strip()
        if name not in POLICY_PARAMETERS:
            raise ValueError(
                f"policy mix '{text}': unknown policy '{name}', choose from {sorted(POLICY_PARAMETERS)}"
            )
        meaning, default = POLICY_PARAMETERS[name]
        try:
            weight = float(weight_text)
            parameter = float(parameter_text) if at else default
        except ValueError:
            raise ValueError(f"policy mix '{text}': cannot read '{item}' as name[@parameter]:weight") from None
        if at and meaning is None:
            raise ValueError(f"policy mix '{text}': policy '{name}' takes no @parameter")
        if not weight > 0 or not math.isfinite(weight):
            raise ValueError(f"policy mix '{text}': weight of '{name}' must be positive and finite, got {weight}")
        if name in PARAMETER_RANGES:  # fail here, naming the mix, not when the first episode builds it
            low, high, high_allowed = PARAMETER_RANGES[name]
            if not (low <= parameter <= high if high_allowed else low <= parameter < high):
                interval = f"[{low:g}, {high:g}{']' if high_allowed else ')'}"
                raise ValueError(f"policy mix '{text}': {name}'s parameter ({meaning}) must be in {interval}, got {parameter}")
        specs.append(PolicySpec(name, parameter, weight))
    if not specs:
        raise ValueError(f"policy mix '{text}' names no policy")
    total = sum(s.weight for s in specs)
    return [PolicySpec(s.name, s.parameter, s.weight / total) for s in specs]
