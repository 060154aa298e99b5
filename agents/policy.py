"""The common policy interface: one way to act in the real env and in imagination.

A policy maps a batch of observations to a batch of actions::

    policy.reset(batch_size, seed=...)            # at the start of a batch of episodes
    actions = policy.act(PolicyInput(tokens=..., frames=..., states=..., minigrid=...))   # (B,) int64

The same kind of input is available in both worlds, so a policy never knows which one it acts in:

=========  ===============================  ====================================================
field      real env                         imagination (world model)
=========  ===============================  ====================================================
tokens     ``tokenizer.encode(frame)``      the model's next tokens (``ImagineStep.tokens``)
frames     the env's RGB frame              ``tokenizer.decode(tokens)`` (only when asked for)
states     ``info["state"]``                the model's state head (``ImagineStep.state``)
minigrid   MiniGrid's ``gen_obs()``, both built from ``states`` (``envs.native_obs``)
=========  ===============================  ====================================================

Scripted policies (random, epsilon-oracle, oracle) read ``states``; learned ones read ``tokens``.
``Policy.inputs`` says which fields a policy reads, so a caller only computes those (decoding
frames in imagination costs a decoder pass).

Saved policies are checkpoints (``torch.save`` of a plain dict) with a ``"kind"`` field;
``load_policy(path)`` dispatches on it through a registry. A new agent registers its kind with
``@register_policy("my_kind")`` on a :class:`Policy` subclass that implements ``checkpoint()``
and ``from_checkpoint()``, and names its module in the checkpoint's ``"module"`` field (set by
:func:`save_policy`), so ``load_policy`` can import it without this file knowing every agent.
Outside policies (``package.module:attr``, TorchScript and stable-baselines3 files) are wrapped by
:mod:`agents.outside`.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from common.atomic import atomic_torch_save
from common.checkpoints import load_checked

NUM_ACTIONS = 7  # MiniGrid: left, right, forward, pickup, drop, toggle, done
CHECKPOINT_FORMAT = 1

# Kinds whose module load_policy imports when a checkpoint does not name its own module.
_KNOWN_KIND_MODULES = {"dreamer": "agents.dreamer", "vagen": "agents.vagen", "ppo": "agents.ppo"}
_REGISTRY: dict[str, type["Policy"]] = {}


@dataclass
class PolicyInput:
    """One batch of observations, in whichever forms the caller has.

    tokens: (B, h, w) int64, one token per grid tile (tokenizer on real frames, model in imagination)
    frames: (B, H, W, 3) uint8 RGB frames
    states: (B, S) integer symbolic states (``envs.state.StateCodec`` layout; model's state head
            in imagination, so possibly an impossible state that scripted policies must survive)
    minigrid: MiniGrid's native observation of those states, ``{"image": (B, 7, 7, 3) uint8,
            "direction": (B,) int64}`` (``envs.native_obs.native_observations``)
    """

    tokens: np.ndarray | None = None
    frames: np.ndarray | None = None
    states: np.ndarray | None = None
    minigrid: dict[str, np.ndarray] | None = None

    @property
    def batch_size(self) -> int:
        for value in (self.tokens, self.frames, self.states, None if self.minigrid is None else self.minigrid["direction"]):
            if value is not None:
                return int(np.shape(value)[0])
        raise ValueError("PolicyInput is empty: give tokens, frames, states or minigrid")

    def require(self, field_name: str, who: str) -> np.ndarray:
        """The field ``field_name`` as a NumPy array, or a clear error naming the policy that needs it."""
        value = getattr(self, field_name)
        if value is None:
            raise ValueError(f"policy '{who}' acts on {field_name}, but the PolicyInput has none")
        return np.asarray(value)


class Policy:
    """Base class of every policy. Subclasses implement :meth:`act` (and :meth:`reset` if stateful).

    Class attributes:
      kind:   registry key written into checkpoints (``"dreamer"``, ``"vagen"``, ``"scripted"``)
      inputs: the ``PolicyInput`` fields :meth:`act` reads
    Instance attribute ``name``: a short label for tables and plots.
    """

    kind: ClassVar[str] = "policy"
    inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str | None = None):
        self.name = name or self.kind
        self.rng = np.random.default_rng(0)
        self.batch_size = 0

    def reset(self, batch_size: int, seed: int | None = None) -> None:
        """Start ``batch_size`` new episodes; ``seed`` seeds the policy's own sampling (reproducible)."""
        self.batch_size = int(batch_size)
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def act(self, inp: PolicyInput) -> np.ndarray:
        """Actions (B,) int64 in [0, 7) for the batch ``inp``."""
        raise NotImplementedError(f"{type(self).__name__}.act(PolicyInput) -> (B,) int64 actions must be implemented")

    def checkpoint(self) -> dict[str, Any]:
        """A plain dict (tensors, numbers, strings, lists, dicts) that :meth:`from_checkpoint` rebuilds
        the policy from. :func:`save_policy` adds ``kind``, ``module`` and ``format``."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot be saved: implement checkpoint() -> dict and from_checkpoint(dict)"
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], device: str = "cpu") -> "Policy":
        """Rebuild a policy from the dict :meth:`checkpoint` returned."""
        raise NotImplementedError(f"{cls.__name__}.from_checkpoint(checkpoint, device) must be implemented")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class TokenActorPolicy(Policy):
    """A policy acting with a network ``self.actor`` on the current frame's tokens (B, h, w):
    ``mode`` ``sample`` draws from its distribution with the policy's own generator (Gumbel-max),
    ``greedy`` takes the most likely action. Subclasses set ``actor``, ``grid_shape``, ``mode``
    and ``device`` (the Dreamer and PPO agents)."""

    inputs = ("tokens",)

    def logits(self, tokens: Any) -> np.ndarray:
        """(B, h, w) tokens -> (B, num_actions) logits as float64 NumPy."""
        import torch

        with torch.no_grad():
            tensor = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=self.device)
            if tuple(tensor.shape[1:]) != self.grid_shape:
                raise ValueError(f"policy '{self.name}' was trained on token grids {self.grid_shape}, "
                                 f"got {tuple(tensor.shape[1:])}")
            return self.actor(tensor).double().cpu().numpy()

    def act(self, inp: PolicyInput) -> np.ndarray:
        logits = self.logits(inp.require("tokens", self.name))
        if self.mode == "greedy":
            return logits.argmax(-1).astype(np.int64)
        gumbel = -np.log(-np.log(self.rng.uniform(1e-12, 1.0, size=logits.shape)))
        return (logits + gumbel).argmax(-1).astype(np.int64)


def register_policy(kind: str) -> Callable[[type[Policy]], type[Policy]]:
    """Class decorator: make ``load_policy`` build checkpoints of ``kind`` with this class."""

    def decorate(cls: type[Policy]) -> type[Policy]:
        existing = _REGISTRY.get(kind)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"policy kind '{kind}' is already registered by {existing.__name__}")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return decorate


def registered_kinds() -> list[str]:
    return sorted(_REGISTRY)


def save_policy(path: str | os.PathLike, policy: Policy, **extra: Any) -> Path:
    """Write ``policy.checkpoint()`` (plus ``extra`` fields) atomically, tagged with kind and module."""
    checkpoint = dict(policy.checkpoint())
    checkpoint.update(extra)
    checkpoint["kind"] = policy.kind
    checkpoint["module"] = type(policy).__module__
    checkpoint["format"] = CHECKPOINT_FORMAT
    checkpoint.setdefault("name", policy.name)
    return atomic_torch_save(path, checkpoint)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A policy checkpoint on the CPU, its weights hash checked, with errors that name the file."""
    return load_checked(path, "policy", "was it written by agents.policy.save_policy?", require="kind")


def load_policy(path: str | os.PathLike, device: str = "cpu") -> Policy:
    """Load any saved policy (Dreamer's, VAGEN's, ...) by the ``kind`` field of its checkpoint."""
    checkpoint = read_checkpoint(path)
    kind = checkpoint["kind"]
    if kind not in _REGISTRY:
        module = checkpoint.get("module") or _KNOWN_KIND_MODULES.get(kind)
        if module:
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise ValueError(f"{path}: policy kind '{kind}' needs module '{module}', which fails to import: {error}") from error
    if kind not in _REGISTRY:
        raise ValueError(f"{path}: unknown policy kind '{kind}'; registered kinds: {registered_kinds()}")
    policy = _REGISTRY[kind].from_checkpoint(checkpoint, device=device)
    if checkpoint.get("name"):
        policy.name = str(checkpoint["name"])
    return policy


# ---------------------------------------------------------------------------------------------
# Scripted policies on symbolic states: random, epsilon-oracle, oracle, sticky random
# ---------------------------------------------------------------------------------------------


@register_policy("scripted")
class ScriptedPolicy(Policy):
    """Adapter: the behaviour policies of :mod:`envs.policies` (one per batch row) on states (B, S).

    ``spec``: ``"random"``, ``"oracle"``, ``"epsilon_oracle@EPS"`` (the oracle's action, a uniform
    random one with probability EPS) or ``"sticky_random@P"`` (repeat the last action with
    probability P), parsed like one entry of a collection policy mix, so "random" here is exactly
    the policy that collected a random dataset. In imagination the oracle plans on the model's
    predicted state; an impossible prediction (nothing to plan on) yields a random action, or
    raises inside the planner, which is also answered with a random action and counted in
    ``oracle_failures``, so a poor state head shows up as a low imagined return, not a crash.
    """

    inputs = ("states",)

    def __init__(self, spec: str, env_id: str = "", name: str | None = None):
        from envs.policies import parse_policy_mix

        specs = parse_policy_mix(spec)
        if len(specs) != 1:
            raise ValueError(f"scripted policy '{spec}' must name exactly one behaviour policy, not a mix")
        super().__init__(name or spec)
        self.spec = spec
        self.behaviour = specs[0]
        self.env_id = env_id
        self.rows: list[Any] = []
        self.oracle_failures = 0
        self._seed = 0
        self._facts: tuple[Any, int, Any] | None = None

    def reset(self, batch_size: int, seed: int | None = None) -> None:
        super().reset(batch_size, seed)
        if seed is not None:
            self._seed = int(seed)
        self.rows = []  # built lazily on the first act(): the codec follows the state length

    def _env_facts(self, state_size: int) -> tuple[Any, int, Any]:
        """(state codec, number of actions, oracle task) of this policy's env, read off the env when
        its id is known (a 7x3 grid, 3 actions, a pick-up mission), else guessed from the state length."""
        if self._facts is None:
            from envs.oracle import GOAL_TASK, task_for_env
            from envs.state import StateCodec

            if self.env_id:
                from envs.make import make_env

                env = make_env(self.env_id)
                try:
                    self._facts = (env.codec, int(env.action_space.n), task_for_env(env))
                finally:
                    env.close()
            else:
                self._facts = (StateCodec.for_array_size(state_size), NUM_ACTIONS, GOAL_TASK)
        return self._facts

    def _build_rows(self, batch_size: int, state_size: int) -> None:
        codec, num_actions, task = self._env_facts(state_size)
        self.rows = []
        for row in range(batch_size):
            behaviour = self.behaviour.build(num_actions, codec, task)
            behaviour.reset(np.random.default_rng([self._seed, row]))
            self.rows.append(behaviour)

    def act(self, inp: PolicyInput) -> np.ndarray:
        states = inp.require("states", self.name).astype(np.int64)
        if len(self.rows) != len(states):
            self._build_rows(len(states), states.shape[1])
        actions = np.empty(len(states), dtype=np.int64)
        for row, (behaviour, state) in enumerate(zip(self.rows, states)):
            try:
                actions[row] = int(behaviour.act(state))
            except Exception:  # the planner choked on an impossible predicted state
                self.oracle_failures += 1
                actions[row] = int(behaviour.rng.integers(self._env_facts(len(state))[1]))
        return actions

    def checkpoint(self) -> dict[str, Any]:
        return {"spec": self.spec, "env_id": self.env_id}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], device: str = "cpu") -> "ScriptedPolicy":
        return cls(checkpoint["spec"], env_id=checkpoint.get("env_id", ""))


@functools.lru_cache(maxsize=None)
def env_action_count(env_id: str) -> int:
    """The action count of env ``env_id`` (``Discrete(n)``): 7 in most of MiniGrid, 3 in Dynamic-Obstacles."""
    from envs.make import make_env

    env = make_env(env_id)
    try:
        return int(env.action_space.n)
    finally:
        env.close()


def make_policy(spec: str, env_id: str = "", device: str = "cpu") -> Policy:
    """A policy from a spec: a scripted name (``random``, ``oracle``, ``epsilon_oracle@0.1``,
    ``sticky_random@0.8``), the path of a saved policy checkpoint (anything ending in ``.pt``), or
    an outside policy (``package.module:attr``, a TorchScript or stable-baselines3 file:
    :mod:`agents.outside`)."""
    from agents.outside import is_outside, load_outside_policy

    if is_outside(spec):
        return load_outside_policy(spec, num_actions=env_action_count(env_id) if env_id else NUM_ACTIONS)
    if spec.endswith(".pt") or os.sep in spec or Path(spec).is_file():
        return load_policy(spec, device=device)
    return ScriptedPolicy(spec, env_id=env_id)
