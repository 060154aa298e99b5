"""Imagination: batched, cached rollouts inside the learned world model, and the dream envs.

- :class:`WorldModel` joins a tokenizer and a dynamics model: ``reset(context_tokens,
  context_actions)`` reads real context frames into the cache, ``step(actions)`` imagines one
  transition for the whole batch (one step of work per step: the cache is the model's recurrent
  memory plus the current frame's features). Frames are decoded only when someone asks
  (:meth:`WorldModel.decode`).
- :func:`imagine_rollout` rolls any policy (a callable from the current tokens and the predicted
  states to actions) for H steps from real starting contexts.
- :class:`DreamVectorEnv` (gymnasium ``VectorEnv``) and :class:`DreamEnv` (gymnasium ``Env``):
  ``reset`` starts from real first frames (a dataset's episode starts, or a real env reset),
  ``step`` runs the model. Observations are token grids (or decoded frames with
  ``obs_mode="frames"``); ``info["tokens"]`` and ``info["state"]`` (the state head's estimate)
  come with every step. ``render()`` decodes the current frame(s).
- :func:`load_world_model` loads ``tokenizer.pt`` + ``dynamics.pt`` of a run folder, checking
  that the dynamics model was trained on that very tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from common.atomic import DIGEST_KEY
from worldmodel.dynamics import DynamicsCache, DynamicsModel, load_dynamics


class TokenizerLike(Protocol):
    """What imagination needs of a tokenizer (see ``worldmodel/tokenizer.py``)."""

    vocab_size: int
    patch_size: int
    identity: str

    def encode(self, frames: Any) -> torch.Tensor: ...  # (..., H, W, 3) uint8 -> (..., h, w) int64

    def decode(self, tokens: Any) -> torch.Tensor: ...  # (..., h, w) -> (..., H, W, 3) uint8


@dataclass
class SamplingConfig:
    """How imagined frames are drawn from the model's token distribution."""

    temperature: float = 0.0  # 0: most likely token (deterministic); > 0: sample
    refine_steps: int = 1  # > 1 (with temperature > 0): MaskGIT-style refinement passes per frame
    guidance: float = 1.0  # classifier-free action guidance scale (1: plain conditional model)
    # With temperature > 0: parallel (every token drawn at once, refined by refine_steps), sequential
    # (unsure cells one at a time, each given those drawn: the joint next frame as far as the
    # decoder's conditionals go) or objects (a token leaving its cell lands on one neighbour: a
    # moved ball never comes out as zero or two; docs/stochastic.md)
    order: str = "parallel"


class ImagineStep:
    """One imagined step for a batch: ``tokens`` (B, h, w) int64 (the new frame), ``reward`` (B,)
    float32, ``terminated`` (B,) bool, ``state`` (B, S) int64 (the state head's estimate of the new
    frame). The state head runs on first access only: a policy reading tokens never pays for it."""

    def __init__(self, tokens: torch.Tensor, reward: torch.Tensor, terminated: torch.Tensor,
                 state: torch.Tensor | None = None, state_fn: Callable[[], torch.Tensor] | None = None):
        if state is None and state_fn is None:
            raise ValueError("ImagineStep needs a state or a function computing it")
        self.tokens, self.reward, self.terminated = tokens, reward, terminated
        self._state, self._state_fn = state, state_fn

    @property
    def state(self) -> torch.Tensor:
        if self._state is None:
            assert self._state_fn is not None
            self._state = self._state_fn()
        return self._state


@dataclass
class Rollout:
    """H imagined steps from B real contexts. ``alive[:, t]``: step t happened before any termination."""

    tokens: torch.Tensor  # (B, H + 1, h, w): the last context frame, then the imagined frames
    states: torch.Tensor  # (B, H + 1, S)
    actions: torch.Tensor  # (B, H)
    rewards: torch.Tensor  # (B, H), 0 after termination
    terminated: torch.Tensor  # (B, H)
    alive: torch.Tensor  # (B, H) bool


def _as_long(values: Any, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values) if not torch.is_tensor(values) else values, device=device).long()


class WorldModel:
    """Tokenizer + dynamics model with a batched, cached imagination state.

    ``reset`` / ``step`` follow docs/interfaces.md. Sampling randomness comes from
    :attr:`generator` (seed it with :meth:`seed`), so a seeded rollout is reproducible.
    """

    def __init__(self, tokenizer: TokenizerLike, dynamics: DynamicsModel, sampling: SamplingConfig | None = None,
                 device: str | torch.device | None = None):
        self.dynamics = dynamics.eval()
        self._trained = self.dynamics  # a full-view model runs on the grid it is reset on (DynamicsModel.on_grid)
        self.device = torch.device(device) if device is not None else next(dynamics.parameters()).device
        self.dynamics.to(self.device)
        self.tokenizer = tokenizer
        if hasattr(tokenizer, "to"):
            tokenizer.to(self.device)  # type: ignore[attr-defined]
        if int(tokenizer.vocab_size) != dynamics.config.vocab_size:
            raise ValueError(
                f"tokenizer vocabulary ({tokenizer.vocab_size}) differs from the dynamics model's ({dynamics.config.vocab_size})"
            )
        self.sampling = sampling or SamplingConfig()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(0)
        self._cache: DynamicsCache | None = None
        self.tokens: torch.Tensor | None = None  # (B, h, w): the current frame
        self._state: torch.Tensor | None = None  # the state head's estimate, once computed

    # ---------------------------------------------------------------- properties
    @property
    def config(self):
        return self.dynamics.config

    @property
    def num_actions(self) -> int:
        return self.dynamics.config.num_actions

    @property
    def token_shape(self) -> tuple[int, int]:
        return self.config.grid_height, self.config.grid_width

    @property
    def state(self) -> torch.Tensor | None:
        """(B, S) int64: the state head's estimate of the current frames (computed on first access)."""
        if self._state is None and self._cache is not None:
            self._state = self._state_of(self._cache)
        return self._state

    @torch.no_grad()
    def _state_of(self, cache: DynamicsCache) -> torch.Tensor:
        return DynamicsModel.state_from_logits(self.dynamics.cache_state_logits(cache))

    @property
    def batch_size(self) -> int:
        return 0 if self.tokens is None else int(self.tokens.shape[0])

    def seed(self, seed: int) -> None:
        """Seed the sampling generator (only matters with temperature > 0)."""
        self.generator.manual_seed(int(seed))

    @torch.no_grad()
    def uncertainty(self, actions: Any) -> torch.Tensor:
        """(B,) the model's doubt about the next step from the current frames under ``actions`` (B,),
        without taking it (:func:`worldmodel.uncertainty.step_uncertainty`)."""
        from worldmodel.uncertainty import step_uncertainty

        if self._cache is None:
            raise RuntimeError("WorldModel.uncertainty: call reset first")
        return step_uncertainty(self.dynamics, self._cache, _as_long(actions, self.device).reshape(-1))

    @torch.no_grad()
    def state_uncertainty(self) -> torch.Tensor:
        """(B,) the state head's doubt about the current frames' state
        (:func:`worldmodel.uncertainty.state_uncertainty`)."""
        from worldmodel.uncertainty import state_uncertainty

        if self._cache is None:
            raise RuntimeError("WorldModel.state_uncertainty: call reset first")
        return state_uncertainty(self.dynamics, self._cache)

    # ---------------------------------------------------------------- tokenizer
    @torch.no_grad()
    def encode(self, frames: Any) -> torch.Tensor:
        """frames (..., H, W, 3) uint8 -> tokens (..., h, w) int64 on the model's device."""
        return torch.as_tensor(self.tokenizer.encode(frames)).to(self.device).long()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor | None = None) -> np.ndarray:
        """tokens (..., h, w) (default: the current frames) -> frames (..., H, W, 3) uint8 array."""
        tokens = self.tokens if tokens is None else tokens
        if tokens is None:
            raise RuntimeError("WorldModel.decode: nothing to decode; call reset first")
        return torch.as_tensor(self.tokenizer.decode(tokens)).cpu().numpy().astype(np.uint8)

    # ---------------------------------------------------------------- imagination
    def _check_tokens(self, tokens: torch.Tensor, what: str) -> None:
        h, w = self.token_shape
        if tuple(tokens.shape[-2:]) != (h, w):
            raise ValueError(f"{what}: token grids must be {h}x{w} for this model, got {tuple(tokens.shape[-2:])}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"{what}: tokens must lie in [0, {self.config.vocab_size})")

    def _context_actions(self, context_actions: Any | None, b: int, t0: int, what: str) -> torch.Tensor:
        """(B, T0 - 1) int64 actions between the context frames (None or empty for T0 = 1)."""
        if context_actions is None:
            context_actions = torch.zeros(b, 0, dtype=torch.long)
        actions = _as_long(context_actions, self.device)
        if actions.numel() == 0:
            actions = actions.reshape(b, 0)
        if tuple(actions.shape) != (b, t0 - 1):
            raise ValueError(f"{what}: context_actions must be (B, T0 - 1) = {(b, t0 - 1)}, got {tuple(actions.shape)}")
        return actions

    @torch.no_grad()
    def reset(self, context_tokens: Any, context_actions: Any | None = None) -> torch.Tensor:
        """Read real context into the cache.

        context_tokens (B, T0, h, w) (or (B, h, w) for a single frame), context_actions (B, T0 - 1)
        (the actions taken between the context frames; None when T0 = 1) -> tokens (B, h, w) of
        the last context frame.
        """
        tokens = _as_long(context_tokens, self.device)
        if tokens.dim() == 3:
            tokens = tokens[:, None]
        if tokens.dim() != 4:
            raise ValueError(f"context_tokens must be (B, T0, h, w), got shape {tuple(tokens.shape)}")
        if self._trained.grid_free:
            self.dynamics = self._trained.on_grid(*tokens.shape[-2:])
        self._check_tokens(tokens, "WorldModel.reset")
        b, t0 = tokens.shape[:2]
        actions = self._context_actions(context_actions, b, t0, "WorldModel.reset")
        self._cache, state_logits = self.dynamics.start(tokens, actions)
        self.tokens = tokens[:, -1]
        self._state = DynamicsModel.state_from_logits(state_logits)
        return self.tokens

    @torch.no_grad()
    def reset_rows(self, rows: Any, context_tokens: Any, context_actions: Any | None = None) -> None:
        """Restart only the batch rows ``rows`` (indices or a (B,) bool mask) from new contexts
        (R, T0, h, w); the other rows keep their imagination going."""
        if self._cache is None or self.tokens is None:
            raise RuntimeError("WorldModel.reset_rows: call reset first")
        index = torch.as_tensor(np.asarray(rows) if not torch.is_tensor(rows) else rows, device=self.device)
        if index.dtype == torch.bool:
            index = index.nonzero()[:, 0]
        if index.numel() == 0:
            return
        tokens = _as_long(context_tokens, self.device)
        if tokens.dim() == 3:
            tokens = tokens[:, None]
        self._check_tokens(tokens, "WorldModel.reset_rows")
        actions = self._context_actions(context_actions, len(index), tokens.shape[1], "WorldModel.reset_rows")
        cache, _ = self.dynamics.start(tokens, actions)
        # New tensors, not in-place writes: an earlier ImagineStep may still compute its state from the old cache.
        old = self._cache
        self._cache = old.replace_rows(index, cache, None if old.memory is None else self.dynamics.memory_of(cache))
        self.tokens = self.tokens.index_copy(0, index, tokens[:, -1])
        self._state = None

    @torch.no_grad()
    def step(self, actions: Any, sampling: SamplingConfig | None = None) -> ImagineStep:
        """Imagine one transition for every row: actions (B,) -> :class:`ImagineStep`."""
        if self._cache is None:
            raise RuntimeError("WorldModel.step: call reset first")
        sampling = sampling or self.sampling
        actions = _as_long(actions, self.device).reshape(-1)
        if actions.shape[0] != self.batch_size:
            raise ValueError(f"WorldModel.step: got {actions.shape[0]} actions for a batch of {self.batch_size}")
        if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= self.num_actions):
            raise ValueError(f"WorldModel.step: actions must lie in [0, {self.num_actions})")
        prediction = self.dynamics.predict(
            self._cache, actions, temperature=sampling.temperature, refine_steps=sampling.refine_steps,
            guidance=sampling.guidance, generator=self.generator, order=sampling.order,
        )
        self._cache, _ = self.dynamics.observe(self._cache, prediction.tokens, actions, with_state=False)
        self.tokens = prediction.tokens
        self._state = None
        cache = self._cache

        def state() -> torch.Tensor:
            if self._cache is cache:  # still the current frame: compute once, share with WorldModel.state
                return self.state  # type: ignore[return-value]
            return self._state_of(cache)

        return ImagineStep(tokens=self.tokens, reward=prediction.reward, terminated=prediction.terminated, state_fn=state)


Policy = Callable[[torch.Tensor, torch.Tensor], Any]  # (tokens (B, h, w), states (B, S)) -> actions (B,)


@torch.no_grad()
def imagine_rollout(world_model: WorldModel, policy: Policy, context_tokens: Any, context_actions: Any | None,
                    horizon: int) -> Rollout:
    """Roll ``policy`` for ``horizon`` imagined steps from real contexts (B, T0, h, w).

    ``policy(tokens (B, h, w), states (B, S)) -> actions (B,)`` (array or tensor); a learned
    policy reads the tokens, a scripted one the predicted states. Rows keep stepping after they
    terminate (the batch stays rectangular); ``alive`` says which steps count.
    """
    tokens = [world_model.reset(context_tokens, context_actions)]
    states = [world_model.state]
    actions, rewards, terminated = [], [], []
    for _ in range(int(horizon)):
        action = _as_long(policy(tokens[-1], states[-1]), world_model.device).reshape(-1)
        step = world_model.step(action)
        tokens.append(step.tokens)
        states.append(step.state)
        actions.append(action)
        rewards.append(step.reward)
        terminated.append(step.terminated)
    b = tokens[0].shape[0]
    if horizon > 0:
        term = torch.stack(terminated, 1)
        done_before = torch.cumsum(term.long(), 1) - term.long()  # terminations strictly before t
        alive = done_before == 0
    else:
        term = torch.zeros(b, 0, dtype=torch.bool, device=world_model.device)
        alive = term.clone()
    return Rollout(
        tokens=torch.stack(tokens, 1), states=torch.stack(states, 1),
        actions=torch.stack(actions, 1) if actions else torch.zeros(b, 0, dtype=torch.long),
        rewards=(torch.stack(rewards, 1) * alive) if rewards else torch.zeros(b, 0),
        terminated=term & alive, alive=alive,
    )


# ---------------------------------------------------------------------------------------------
# Where dream episodes start: real first frames
# ---------------------------------------------------------------------------------------------


class StartSource(Protocol):
    """Real first frames: ``sample(rng, n) -> (tokens (n, h, w) int64, states (n, S) or None)``."""

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray | None]: ...


class DatasetStarts:
    """First frames of a dataset's episodes. ``tokens`` (N_frames, h, w): the tokens of every frame
    of ``dataset`` (e.g. ``dataset.extras["tokens"]``); default: tokenise the first frames here."""

    def __init__(self, dataset: Any, tokens: np.ndarray | None = None, tokenizer: TokenizerLike | None = None):
        starts = np.asarray(dataset.episode_starts)
        if tokens is None and "tokens" in getattr(dataset, "extras", {}):
            tokens = dataset.extras["tokens"]
        if tokens is not None:
            self.tokens = np.asarray(tokens)[starts].astype(np.int64)
        elif tokenizer is not None:
            self.tokens = torch.as_tensor(tokenizer.encode(dataset.frames[starts])).cpu().numpy().astype(np.int64)
        else:
            raise ValueError("DatasetStarts needs the dataset's tokens or a tokenizer to make them")
        self.states = np.asarray(dataset.states)[starts].astype(np.int64)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        pick = rng.integers(len(self.tokens), size=n)
        return self.tokens[pick], self.states[pick]


class EnvStarts:
    """First frames of real env resets: ``make_env()`` builds the env, each start resets it with a
    seed drawn from the dream env's generator."""

    def __init__(self, make_env: Callable[[], gym.Env], tokenizer: TokenizerLike):
        self.env = make_env()
        self.tokenizer = tokenizer

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        frames, states = [], []
        for seed in rng.integers(2**31 - 1, size=n):
            frame, info = self.env.reset(seed=int(seed))
            frames.append(frame)
            states.append(info.get("state"))
        tokens = torch.as_tensor(self.tokenizer.encode(np.stack(frames))).cpu().numpy().astype(np.int64)
        have_states = all(s is not None for s in states)
        return tokens, (np.stack(states).astype(np.int64) if have_states else None)


# ---------------------------------------------------------------------------------------------
# Dream envs
# ---------------------------------------------------------------------------------------------


DREAM_REWARDS = ("step_aware", "model")


def step_aware_reward(reward: np.ndarray, step: np.ndarray | int, max_steps: int) -> np.ndarray:
    """MiniGrid's reward rule applied to the model's prediction: a success (a positive predicted
    reward) at step ``step`` (1-based) of an episode of at most ``max_steps`` pays
    ``1 - 0.9 * step / max_steps``, as every MiniGrid env of the suite does (``MiniGridEnv._reward``);
    zero and negative rewards (lava's 0, an obstacle's -1) do not depend on the step and are paid as
    predicted. The step count is not in a frame, so a reward head can only pay its average over the
    data (0.487 on DoorKey-5x5 where the real env paid 0.963); the dream env knows the step."""
    reward = np.asarray(reward, dtype=np.float64)
    paid = 1.0 - 0.9 * (np.asarray(step, dtype=np.float64) / float(max_steps))  # MiniGrid's own order of operations
    return np.where(reward > 0, paid, reward)


def _check_reward(reward: str) -> str:
    if reward not in DREAM_REWARDS:
        raise ValueError(f"dream env reward must be one of {DREAM_REWARDS}, got '{reward}'")
    return reward


def _spaces(world_model: WorldModel, obs_mode: str) -> tuple[spaces.Space, spaces.Space]:
    h, w = world_model.token_shape
    if obs_mode == "tokens":
        observation = spaces.MultiDiscrete(np.full((h, w), world_model.config.vocab_size, dtype=np.int64))
    elif obs_mode == "frames":
        p = int(world_model.tokenizer.patch_size)
        observation = spaces.Box(0, 255, shape=(h * p, w * p, 3), dtype=np.uint8)
    else:
        raise ValueError(f"dream env obs_mode must be 'tokens' or 'frames', got '{obs_mode}'")
    return observation, spaces.Discrete(world_model.num_actions)


class DreamVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` episodes imagined in one batch. Autoreset: NEXT_STEP (gymnasium's default): the
    step after an episode ends returns the next episode's first frame with reward 0.

    observation_space: MultiDiscrete (num_envs, h, w) of tokens (``obs_mode="tokens"``) or Box uint8
    (num_envs, H, W, 3) frames (``obs_mode="frames"``, decoded every step); action_space:
    MultiDiscrete([num_actions] * num_envs). ``info["tokens"]`` (num_envs, h, w),
    ``info["state"]`` (num_envs, S) from the state head; after reset also ``info["real_state"]``
    when the start source knows it. Episodes are truncated after ``max_episode_steps``.
    ``reward="step_aware"`` (default) pays MiniGrid's reward rule at the episode's step count
    (:func:`step_aware_reward`; set ``max_episode_steps`` to the real env's ``max_steps`` so the pay
    and the truncation are the real env's); ``"model"`` pays the reward head's value.
    """

    metadata = {"render_modes": ["rgb_array"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, world_model: WorldModel, starts: StartSource, num_envs: int, max_episode_steps: int = 100,
                 obs_mode: str = "tokens", render_mode: str | None = "rgb_array", reward: str = "step_aware"):
        if num_envs < 1:
            raise ValueError(f"num_envs must be positive, got {num_envs}")
        self.reward = _check_reward(reward)
        self.world_model = world_model
        self.starts = starts
        self.num_envs = int(num_envs)
        self.max_episode_steps = int(max_episode_steps)
        self.obs_mode = obs_mode
        self.render_mode = render_mode
        self.single_observation_space, self.single_action_space = _spaces(world_model, obs_mode)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._elapsed = np.zeros(self.num_envs, dtype=np.int64)
        self._needs_reset = np.zeros(self.num_envs, dtype=bool)
        self._np_random = None

    def _observation(self) -> np.ndarray:
        if self.obs_mode == "frames":
            return self.world_model.decode()
        assert self.world_model.tokens is not None
        return self.world_model.tokens.cpu().numpy().astype(np.int64)

    def _info(self) -> dict[str, Any]:
        assert self.world_model.tokens is not None and self.world_model.state is not None
        return {"tokens": self.world_model.tokens.cpu().numpy().astype(np.int64),
                "state": self.world_model.state.cpu().numpy().astype(np.int64)}

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        """Start every env from a real first frame (``options["tokens"]`` (num_envs, h, w) to choose them)."""
        if isinstance(seed, (list, tuple)):
            seed = int(seed[0]) if seed and seed[0] is not None else None
        if seed is not None or self._np_random is None:
            self._np_random, _ = gym.utils.seeding.np_random(seed)
            self.world_model.seed(int(self._np_random.integers(2**31 - 1)))
        options = options or {}
        if "tokens" in options:
            tokens, real = np.asarray(options["tokens"]), options.get("state")
        else:
            tokens, real = self.starts.sample(self._np_random, self.num_envs)
        self.world_model.reset(tokens)
        self._elapsed[:] = 0
        self._needs_reset[:] = False
        info = self._info()
        if real is not None:
            info["real_state"] = np.asarray(real, dtype=np.int64)
        return self._observation(), info

    def step(self, actions: Any):
        actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)
        if self.world_model.tokens is None:
            raise RuntimeError("DreamVectorEnv.step: call reset first")
        # Rows that ended last step are restarted instead of stepped (their action is ignored).
        safe_actions = np.where(self._needs_reset, 0, actions)
        result = self.world_model.step(safe_actions)
        reward = result.reward.cpu().numpy().astype(np.float64)
        terminated = result.terminated.cpu().numpy().astype(bool)
        self._elapsed += 1
        if self.reward == "step_aware":
            reward = step_aware_reward(reward, self._elapsed, self.max_episode_steps)
        truncated = (self._elapsed >= self.max_episode_steps) & ~terminated
        restart = self._needs_reset.copy()
        if restart.any():
            tokens, _ = self.starts.sample(self._np_random, int(restart.sum()))
            self.world_model.reset_rows(restart, tokens)
            reward[restart] = 0.0
            terminated[restart] = False
            truncated[restart] = False
            self._elapsed[restart] = 0
        self._needs_reset = terminated | truncated
        return self._observation(), reward, terminated, truncated, self._info()

    def render(self) -> np.ndarray | None:
        """The current frames (num_envs, H, W, 3) uint8, decoded now."""
        if self.render_mode != "rgb_array" or self.world_model.tokens is None:
            return None
        return self.world_model.decode()


class DreamEnv(gym.Env):
    """One episode imagined by the world model: a gymnasium ``Env`` any agent can train in.

    observation_space: MultiDiscrete (h, w) of tokens (``obs_mode="tokens"``) or Box uint8
    (H, W, 3) (``obs_mode="frames"``); action_space: Discrete(num_actions). ``reset`` starts from a
    real first frame drawn with the env's seeded generator (or ``options["tokens"]`` (h, w)); the
    episode ends when the model predicts termination, and is truncated after ``max_episode_steps``.
    ``info["tokens"]``, ``info["state"]`` (the state head's estimate); ``render()`` decodes.
    ``reward``: as :class:`DreamVectorEnv`'s (``"step_aware"``: MiniGrid's rule at the step count,
    with ``max_episode_steps`` the real env's ``max_steps``).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, world_model: WorldModel, starts: StartSource, max_episode_steps: int = 100,
                 obs_mode: str = "tokens", render_mode: str | None = "rgb_array", reward: str = "step_aware"):
        self.reward = _check_reward(reward)
        self.world_model = world_model
        self.starts = starts
        self.max_episode_steps = int(max_episode_steps)
        self.obs_mode = obs_mode
        self.render_mode = render_mode
        self.observation_space, self.action_space = _spaces(world_model, obs_mode)
        self._elapsed = 0

    def _observation(self) -> np.ndarray:
        if self.obs_mode == "frames":
            return self.world_model.decode()[0]
        assert self.world_model.tokens is not None
        return self.world_model.tokens[0].cpu().numpy().astype(np.int64)

    def _info(self) -> dict[str, Any]:
        assert self.world_model.tokens is not None and self.world_model.state is not None
        return {"tokens": self.world_model.tokens[0].cpu().numpy().astype(np.int64),
                "state": self.world_model.state[0].cpu().numpy().astype(np.int64)}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        # The model's sampling generator follows the env's: a seeded episode is reproducible.
        self.world_model.seed(int(self.np_random.integers(2**31 - 1)))
        options = options or {}
        if "tokens" in options:
            tokens, real = np.asarray(options["tokens"])[None], options.get("state")
        else:
            tokens, real = self.starts.sample(self.np_random, 1)
            real = None if real is None else real[0]
        self.world_model.reset(tokens)
        self._elapsed = 0
        info = self._info()
        if real is not None:
            info["real_state"] = np.asarray(real, dtype=np.int64)
        return self._observation(), info

    def step(self, action: Any):
        if self.world_model.tokens is None:
            raise RuntimeError("DreamEnv.step: call reset first")
        result = self.world_model.step(np.asarray([int(action)]))
        self._elapsed += 1
        terminated = bool(result.terminated[0])
        truncated = (self._elapsed >= self.max_episode_steps) and not terminated
        reward = float(result.reward[0])
        if self.reward == "step_aware":
            reward = float(step_aware_reward(reward, self._elapsed, self.max_episode_steps))
        return self._observation(), reward, terminated, truncated, self._info()

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array" or self.world_model.tokens is None:
            return None
        return self.world_model.decode()[0]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_world_model(run_dir: str | Path | None = None, tokenizer_path: str | Path | None = None,
                     dynamics_path: str | Path | None = None, device: str | torch.device = "cpu",
                     sampling: SamplingConfig | None = None) -> WorldModel:
    """Load ``<run_dir>/tokenizer.pt`` and ``<run_dir>/dynamics.pt`` (or explicit paths) as a
    :class:`WorldModel` whose ``identity`` is the dynamics weights' hash; fails clearly when a file
    is missing, corrupt or the dynamics model was trained with another tokenizer. ``sampling``
    defaults to the one saved with the dynamics model."""
    from worldmodel.tokenizer import load_tokenizer

    if run_dir is None and (tokenizer_path is None or dynamics_path is None):
        raise ValueError("load_world_model: give run_dir, or both tokenizer_path and dynamics_path")
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else Path(run_dir) / "tokenizer.pt"  # type: ignore[arg-type]
    dynamics_path = Path(dynamics_path) if dynamics_path else Path(run_dir) / "dynamics.pt"  # type: ignore[arg-type]
    dynamics, checkpoint = load_dynamics(dynamics_path, device=device)
    tokenizer = load_tokenizer(tokenizer_path, identity=checkpoint["tokenizer_identity"], device=device)
    saved = checkpoint.get("sampling") or {}
    world_model = WorldModel(tokenizer, dynamics, sampling=sampling or SamplingConfig(**saved), device=device)
    # What the weights are (not when or where they were trained): agents record it, so an agent
    # trained in another model is never taken for a finished stage.
    world_model.identity = str(checkpoint[DIGEST_KEY])[:16]
    return world_model
