"""Bring your own policy: outside code evaluated like the sandbox's own policies.

An outside policy is one of (see ``docs/your_policy.md``):

- ``package.module:attr``, a Python object path: a class (instantiated with no arguments), a
  factory (a function of no arguments) returning an object with ``act(obs_batch) -> actions`` and
  optionally ``reset(batch_size, seed)``, or a plain callable ``f(obs_batch) -> actions``;
- a TorchScript file (``torch.jit.save``), a module whose ``forward`` takes the declared input and
  returns logits (B, num_actions) (the greedy action is taken) or actions (B,);
- a stable-baselines3 ``.zip`` (the ``sb3`` extra), acting deterministically.

Each declares the one input it reads with an attribute ``inputs`` (or ``observation``), default
``frames``:

==========  ==================================================================================
frames      RGB frames (B, H, W, 3) uint8 (in imagination: the tokenizer's decoding)
tokens      the run's tokens (B, h, w) int64
states      the symbolic state (B, S) uint8 (``envs.state.StateCodec``; the state head's in imagination)
minigrid    MiniGrid's native observation ``{"image": (B, 7, 7, 3) uint8, "direction": (B,) int64}``,
            built from the state by :func:`envs.native_obs.native_observations`
==========  ==================================================================================

:class:`OutsidePolicy` wraps any of them in the :class:`agents.policy.Policy` interface, so
``run_real`` and ``run_imagined`` hand it exactly what it declared in both worlds, and checks what
it returns: (B,) integers in ``[0, NUM_ACTIONS)``, or an error naming the policy.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from agents.policy import NUM_ACTIONS, Policy, PolicyInput

OUTSIDE_INPUTS = ("frames", "tokens", "states", "minigrid")
DEFAULT_INPUT = "frames"
SB3_EXTRA = "sb3"
_OBJECT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class PolicyError(ValueError):
    """An outside policy broke the contract while acting (an illegal action, a missing input); the
    message names the policy."""


def is_object_path(spec: str) -> bool:
    """``package.module:attr`` (not a file path, not a scripted policy name)."""
    return bool(_OBJECT_PATH.fullmatch(spec.strip()))


def outside_file_kind(path: str | os.PathLike) -> str | None:
    """``"torchscript"`` or ``"sb3"`` for a file of those formats, None otherwise (a sandbox
    checkpoint, or not a zip at all). Told apart by the zip's members: TorchScript archives hold
    ``constants.pkl`` and ``code/``, stable-baselines3 ones ``policy.pth`` and ``data``, while a
    ``torch.save`` checkpoint holds only ``data.pkl`` and its tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    if {"policy.pth", "data"} <= set(names):
        return "sb3"
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    return None


def is_outside(spec: str) -> bool:
    """Whether ``make_policy`` hands ``spec`` to :func:`load_outside_policy`."""
    return is_object_path(spec) or (Path(spec).is_file() and outside_file_kind(spec) is not None)


def outside_identity(spec: str) -> str:
    """A content identity: the hash of the module's source file (``module:attr``; only that file:
    code it imports is not part of it) or of the file's bytes. A changed policy reruns the evaluation."""
    if is_object_path(spec):
        module = _import_module(spec, spec.partition(":")[0])
        source = getattr(module, "__file__", None)
        if not source or not Path(source).is_file():
            return hashlib.sha256(spec.encode()).hexdigest()[:16]
        path = Path(source)
    else:
        path = Path(spec)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------


def check_actions(actions: Any, batch_size: int, who: str, num_actions: int = NUM_ACTIONS) -> np.ndarray:
    """``actions`` as (B,) int64, or a :class:`PolicyError` naming the policy: what came back must be (B,)
    integers (a NumPy array, a tensor or a list) in ``[0, num_actions)`` (the env's action count), or
    (B, num_actions) float logits, of which the greedy action is taken."""
    if hasattr(actions, "detach"):  # a torch tensor
        actions = actions.detach().cpu().numpy()
    array = np.asarray(actions)
    if array.ndim == 2 and np.issubdtype(array.dtype, np.floating):
        if array.shape[1] != num_actions:
            raise PolicyError(f"policy '{who}' returned logits of shape {array.shape}, expected (B, {num_actions})")
        array = array.argmax(axis=1)
    if array.shape != (batch_size,):
        raise PolicyError(f"policy '{who}' returned actions of shape {array.shape}, expected ({batch_size},)")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise PolicyError(f"policy '{who}' returned actions of dtype {array.dtype}, expected integers")
    if array.size and (array.min() < 0 or array.max() >= num_actions):
        raise PolicyError(f"policy '{who}' returned action {int(array.min() if array.min() < 0 else array.max())}, "
                         f"outside Discrete({num_actions})")
    return array.astype(np.int64)


def observation_for(inp: PolicyInput, field: str, who: str) -> Any:
    """The declared input in its documented dtype (states: uint8 in both worlds, though the state
    head's estimate arrives as int64)."""
    if field == "minigrid":
        if inp.minigrid is None:
            raise PolicyError(f"policy '{who}' acts on minigrid, but the PolicyInput has none")
        return {"image": np.asarray(inp.minigrid["image"], dtype=np.uint8),
                "direction": np.asarray(inp.minigrid["direction"], dtype=np.int64)}
    value = inp.require(field, who)
    dtype = {"frames": np.uint8, "tokens": np.int64, "states": np.uint8}[field]
    return np.clip(value, 0, 255).astype(dtype) if field == "states" else value.astype(dtype, copy=False)


class OutsidePolicy(Policy):
    """Any outside policy in the :class:`Policy` interface.

    ``act_fn(observation) -> actions`` is the outside code's act (``obj.act``, the callable itself,
    a TorchScript module's forward, SB3's ``predict``); ``reset_fn(batch_size, seed)`` is called at
    episode starts if given; ``field`` is the one input it declared (:data:`OUTSIDE_INPUTS`).
    ``num_actions``: the env's action count its actions are checked against (``make_policy`` sets
    it from the env id: Dynamic-Obstacles has 3).
    """

    kind = "outside"

    def __init__(self, act_fn: Callable[[Any], Any], field: str, name: str,
                 reset_fn: Callable[[int, int | None], None] | None = None):
        super().__init__(name)
        if field not in OUTSIDE_INPUTS:
            raise ValueError(f"policy '{name}' declares inputs '{field}': choose one of {OUTSIDE_INPUTS}")
        self.inputs = (field,)
        self.field = field
        self.act_fn = act_fn
        self.reset_fn = reset_fn
        self.num_actions = NUM_ACTIONS

    def reset(self, batch_size: int, seed: int | None = None) -> None:
        super().reset(batch_size, seed)
        if self.reset_fn is not None:
            self.reset_fn(int(batch_size), seed)

    def act(self, inp: PolicyInput) -> np.ndarray:
        observation = observation_for(inp, self.field, self.name)
        return check_actions(self.act_fn(observation), inp.batch_size, self.name, self.num_actions)


def declared_input(*sources: Any, who: str) -> str:
    """The first ``inputs`` (or ``observation``) attribute among ``sources``: a string or a
    one-element sequence; :data:`DEFAULT_INPUT` if none declares one."""
    for source in sources:
        for attribute in ("inputs", "observation"):
            value = getattr(source, attribute, None)
            if value is None:
                continue
            if isinstance(value, (list, tuple)) and len(value) == 1:
                value = value[0]
            if not isinstance(value, str) or value not in OUTSIDE_INPUTS:
                raise ValueError(f"policy '{who}' declares {attribute} = {value!r}: choose one of {OUTSIDE_INPUTS}")
            return value
    return DEFAULT_INPUT


def _reset_caller(reset: Callable[..., Any]) -> Callable[[int, int | None], None]:
    """``reset(batch_size, seed=seed)`` for a reset that takes the seed, ``reset(batch_size)`` otherwise."""
    try:
        parameters = inspect.signature(reset).parameters
    except (TypeError, ValueError):
        return lambda batch_size, seed: reset(batch_size, seed)
    kinds = {p.kind for p in parameters.values()}
    if "seed" in parameters or inspect.Parameter.VAR_KEYWORD in kinds:
        return lambda batch_size, seed: reset(batch_size, seed=seed)
    if len(parameters) >= 2 or inspect.Parameter.VAR_POSITIONAL in kinds:
        return lambda batch_size, seed: reset(batch_size, seed)
    return lambda batch_size, seed: reset(batch_size)


# ---------------------------------------------------------------------------------------------
# Loaders: module:attr, TorchScript, stable-baselines3
# ---------------------------------------------------------------------------------------------


def _import_module(spec: str, module_name: str) -> Any:
    # `python scripts/evaluate.py` puts the script's folder on sys.path, not the one it runs from,
    # where a user's own module usually is.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(f"policy '{spec}': no module named '{error.name}'") from None
    except Exception as error:  # the module itself fails to import
        raise ValueError(f"policy '{spec}': importing module '{module_name}' fails: "
                         f"{type(error).__name__}: {error}") from None


def _requires_argument(function: Callable[..., Any]) -> bool:
    """Whether calling ``function()`` with no arguments would be missing one (a policy callable,
    not a factory)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)


def load_object_policy(spec: str) -> OutsidePolicy:
    """``package.module:attr``: a class, a factory or a policy callable (see the module docstring)."""
    module_name, _, attribute_path = spec.strip().partition(":")
    target: Any = _import_module(spec, module_name)
    for attribute in attribute_path.split("."):
        if not hasattr(target, attribute):
            raise ValueError(f"policy '{spec}': module '{module_name}' has no attribute '{attribute_path}'")
        target = getattr(target, attribute)
    agent = target
    if inspect.isclass(target) or (inspect.isroutine(target) and not _requires_argument(target)):
        try:
            agent = target()
        except Exception as error:
            raise ValueError(f"policy '{spec}': calling {attribute_path}() fails: {type(error).__name__}: {error}") from None
    if hasattr(agent, "act") and callable(agent.act):
        act_fn = agent.act
    elif callable(agent):
        act_fn = agent
    else:
        raise ValueError(f"policy '{spec}': {type(agent).__name__} object has no act(obs_batch) method and is not callable")
    reset = getattr(agent, "reset", None)
    reset_fn = _reset_caller(reset) if callable(reset) and not inspect.isclass(agent) else None
    return OutsidePolicy(act_fn, declared_input(agent, target, who=spec), name=spec, reset_fn=reset_fn)


def load_torchscript_policy(path: str | os.PathLike) -> OutsidePolicy:
    """A TorchScript module: ``forward(x)`` on the declared input as tensors (frames uint8 (B, H, W,
    3), tokens int64, states uint8, minigrid a ``Dict[str, Tensor]`` of image uint8 and direction
    int64), returning logits (B, num_actions), of which the greedy action is taken, or actions (B,).
    It declares its input with a string attribute ``inputs`` set in ``__init__`` (default frames)."""
    import torch

    who = str(path)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise ValueError(f"policy '{who}': not a loadable TorchScript file: {error}") from None
    module.eval()
    field = declared_input(module, who=who)

    @torch.no_grad()
    def act(observation: Any) -> Any:
        if field == "minigrid":
            out = module({key: torch.as_tensor(value) for key, value in observation.items()})
        else:
            out = module(torch.as_tensor(observation))
        if not isinstance(out, torch.Tensor):
            raise PolicyError(f"policy '{who}' returned a {type(out).__name__}, expected a tensor of logits or actions")
        return out  # logits (B, num_actions) or actions (B,): check_actions takes either

    return OutsidePolicy(act, field, name=Path(path).stem)


def load_sb3_policy(path: str | os.PathLike) -> OutsidePolicy:
    """A stable-baselines3 model (PPO, A2C or DQN ``.zip``), acting with ``predict(obs,
    deterministic=True)``. Its observation space says what it reads: a Dict with ``image`` (and
    ``direction``) or a (7, 7, 3) image is the native MiniGrid observation, any other image the frames."""
    who = str(path)
    try:
        import stable_baselines3 as sb3
    except ImportError:
        raise ValueError(f"policy '{who}' is a stable-baselines3 model, and stable_baselines3 is not installed: "
                         f"install the '{SB3_EXTRA}' extra (pip install 'gridworld-sandbox[{SB3_EXTRA}]')") from None
    model, failures = None, []
    for algorithm in (sb3.PPO, sb3.A2C, sb3.DQN):
        try:
            model = algorithm.load(str(path), device="cpu")
            break
        except Exception as error:  # saved by another algorithm
            failures.append(f"{algorithm.__name__}: {error}")
    if model is None:
        raise ValueError(f"policy '{who}': not a PPO, A2C or DQN model ({'; '.join(failures)})")
    space = model.observation_space
    keys = list(getattr(space, "spaces", {}) or {})
    if keys:
        if "image" not in keys:
            raise ValueError(f"policy '{who}' reads a Dict observation {keys}: only MiniGrid's image/direction is served")
        shapes = {key: tuple(space.spaces[key].shape) for key in keys}
        field = "minigrid"
        convert = lambda obs: {key: _laid_out(obs[key], shapes[key], who) for key in keys if key in obs}  # noqa: E731
    elif tuple(space.shape) in ((7, 7, 3), (3, 7, 7)):
        shape = tuple(space.shape)
        field, convert = "minigrid", (lambda obs: _laid_out(obs["image"], shape, who))
    else:
        shape = tuple(space.shape)
        field, convert = "frames", (lambda obs: _laid_out(obs, shape, who))
    return OutsidePolicy(lambda obs: model.predict(convert(obs), deterministic=True)[0], field, name=Path(path).stem)


def _laid_out(batch: np.ndarray, shape: tuple[int, ...], who: str) -> np.ndarray:
    """A channels-last image batch in the layout the model's observation space has: stable-baselines3
    saves image spaces channels-first (its ``VecTransposeImage``), so (B, H, W, C) becomes (B, C, H, W)."""
    batch = np.asarray(batch)
    if batch.shape[1:] == shape:
        return batch
    if batch.ndim == 4 and (batch.shape[3], *batch.shape[1:3]) == shape:
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
    raise ValueError(f"policy '{who}' reads observations of shape {shape}, and this env serves {batch.shape[1:]}")


def load_outside_policy(spec: str, num_actions: int = NUM_ACTIONS) -> OutsidePolicy:
    """An outside policy from ``package.module:attr`` or a TorchScript / stable-baselines3 file,
    whose actions are checked against ``num_actions`` (the env's)."""
    kind = "object" if is_object_path(spec) else outside_file_kind(spec)
    loaders = {"object": load_object_policy, "torchscript": load_torchscript_policy, "sb3": load_sb3_policy}
    if kind in loaders:
        policy = loaders[kind](spec)
        policy.num_actions = int(num_actions)
        return policy
    raise ValueError(f"policy '{spec}' is neither package.module:attr nor a TorchScript or stable-baselines3 file")
