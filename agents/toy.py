"""A toy world model with a known answer, for tests and for checking the agent apart from any
learned model: a corridor of ``length`` tiles, goal at the right end.

Tokens (B, 1, length): 0 empty, 1 agent, 2 goal. Actions follow MiniGrid's numbering: ``forward``
(2) moves right, ``left`` (0) moves left, every other action does nothing. Reaching the goal gives
reward 1 and terminates. The best policy is "always forward", and from position p its return is
1 after ``length - 1 - p`` steps. It answers ``reset``/``step`` like ``worldmodel.imagine.WorldModel``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

EMPTY_TOKEN, AGENT_TOKEN, GOAL_TOKEN = 0, 1, 2
LEFT, FORWARD = 0, 2


@dataclass
class ToyStep:
    """Same fields as ``worldmodel.imagine.ImagineStep``."""

    tokens: torch.Tensor  # (B, 1, length) int64
    reward: torch.Tensor  # (B,) float32
    terminated: torch.Tensor  # (B,) bool
    state: torch.Tensor  # (B, 1) int64: the agent's position


class ToyCorridorModel:
    """Batched corridor "world model"; exact, so imagined returns are the true ones."""

    vocab_size = 3

    def __init__(self, length: int = 6):
        self.length = int(length)
        self.position = torch.zeros(0, dtype=torch.long)
        self.tokenizer = CorridorTokenizer()

    def render(self, position: torch.Tensor) -> torch.Tensor:
        """(B,) positions -> (B, 1, length) tokens."""
        tokens = torch.full((len(position), 1, self.length), EMPTY_TOKEN, dtype=torch.long)
        tokens[:, 0, -1] = GOAL_TOKEN
        tokens[torch.arange(len(position)), 0, position] = AGENT_TOKEN
        return tokens

    def reset(self, context_tokens: torch.Tensor, context_actions: torch.Tensor) -> torch.Tensor:
        """context_tokens (B, T0, 1, length): the agent's position is read off the last frame."""
        last = torch.as_tensor(context_tokens)[:, -1, 0]  # (B, length)
        self.position = (last == AGENT_TOKEN).long().argmax(-1)
        return self.render(self.position)

    def step(self, actions: torch.Tensor) -> ToyStep:
        actions = torch.as_tensor(actions)
        move = (actions == FORWARD).long() - (actions == LEFT).long()
        self.position = (self.position + move).clamp(0, self.length - 1)
        at_goal = self.position == self.length - 1
        return ToyStep(self.render(self.position), at_goal.float(), at_goal, self.position[:, None].clone())

    def start_tokens(self, positions: torch.Tensor) -> torch.Tensor:
        """(B,) start positions -> (B, 1, 1, length) context tokens for :meth:`reset`."""
        return self.render(torch.as_tensor(positions))[:, None]


class CorridorTokenizer:
    """Frames of the corridor: each token is a ``patch_size`` square tile of grey level 100 * token.

    encode (..., p, length * p, 3) uint8 -> (..., 1, length); decode the inverse. Lets the
    evaluation code (which starts imagination from real frames) run against the toy model.
    """

    vocab_size = 3
    patch_size = 4
    identity = "toy-corridor"

    def encode(self, frames: Any) -> torch.Tensor:
        frames = torch.as_tensor(np.asarray(frames))
        p = self.patch_size
        return (frames[..., ::p, ::p, 0].long() + 50) // 100  # (..., 1, length)

    def decode(self, tokens: Any) -> torch.Tensor:
        tokens = torch.as_tensor(np.asarray(tokens)).long()
        p = self.patch_size
        grey = (tokens * 100).to(torch.uint8).repeat_interleave(p, -1).repeat_interleave(p, -2)
        return grey[..., None].expand(*grey.shape, 3).contiguous()


# ---------------------------------------------------------------------------------------------
# A perfect world model of a real MiniGrid env: the simulator itself behind the same interface
# ---------------------------------------------------------------------------------------------


class TileTable:
    """An exact frame tokenizer for one dataset: every distinct tile_size x tile_size tile gets an id.

    Same ``encode``/``decode``/``vocab_size``/``patch_size``/``identity`` as
    ``worldmodel.tokenizer.Tokenizer``; a tile never seen is encoded as the closest known one.
    Used with :class:`SimulatorWorldModel` to tell the agent's failures from the world model's.
    """

    def __init__(self, tiles: np.ndarray):
        self.tiles = np.asarray(tiles, dtype=np.uint8)  # (V, p, p, 3)
        self.patch_size = int(self.tiles.shape[1])
        self.vocab_size = int(len(self.tiles))
        keys = np.ascontiguousarray(self.tiles.reshape(self.vocab_size, -1)).view(f"V{self.tiles[0].size}").ravel()
        self._sorted_ids = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[self._sorted_ids]
        self.identity = "tiletable-" + hashlib.sha1(self.tiles.tobytes()).hexdigest()[:12]

    @classmethod
    def from_frames(cls, frames: np.ndarray, tile_size: int) -> "TileTable":
        n, h, w, _ = frames.shape
        p = tile_size
        tiles = frames.reshape(n, h // p, p, w // p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p * 3)
        keys = np.ascontiguousarray(tiles).view(f"V{p * p * 3}").ravel()
        _, first = np.unique(keys, return_index=True)  # unique on bytes: far faster than unique(axis=0)
        return cls(tiles[np.sort(first)].reshape(-1, p, p, 3))

    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """frames (..., H, W, 3) uint8 -> tokens (..., H/p, W/p) int64."""
        frames = np.asarray(frames, dtype=np.uint8)
        lead, (h, w) = frames.shape[:-3], frames.shape[-3:-1]
        p = self.patch_size
        flat = frames.reshape(-1, h // p, p, w // p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p, p, 3)
        keys = np.ascontiguousarray(flat.reshape(len(flat), -1)).view(f"V{p * p * 3}").ravel()
        position = np.clip(np.searchsorted(self._sorted_keys, keys), 0, self.vocab_size - 1)
        ids = self._sorted_ids[position]
        for i in np.flatnonzero(self._sorted_keys[position] != keys):  # unseen tiles: the closest known one
            ids[i] = int(np.abs(self.tiles.astype(np.int32) - flat[i].astype(np.int32)).sum((1, 2, 3)).argmin())
        return torch.as_tensor(ids.reshape(*lead, h // p, w // p))

    def decode(self, tokens: np.ndarray | torch.Tensor) -> torch.Tensor:
        """tokens (..., h, w) -> frames (..., h*p, w*p, 3) uint8."""
        tokens = np.asarray(tokens, dtype=np.int64)
        lead, (h, w) = tokens.shape[:-2], tokens.shape[-2:]
        p = self.patch_size
        patches = self.tiles[tokens.reshape(-1, h, w)]  # (N, h, w, p, p, 3)
        return torch.as_tensor(patches.transpose(0, 1, 3, 2, 4, 5).reshape(*lead, h * p, w * p, 3))


class SimulatorWorldModel:
    """The real MiniGrid simulator behind the world-model interface (``reset``/``step``).

    ``reset`` finds the symbolic state of each context's last frame in ``states_by_tokens`` (built
    from a dataset: tokens -> state), puts one env per row into it, and ``step`` runs the real
    envs and tokenizes their frames. The one thing it cannot know is the step count, which
    MiniGrid's reward depends on: it restarts at 0, as after a reset.
    """

    def __init__(self, env_id: str, tokenizer: Any, states_by_tokens: dict[bytes, np.ndarray], tile_size: int = 8):
        from envs.make import make_env

        self.env_id, self.tokenizer, self.states_by_tokens = env_id, tokenizer, states_by_tokens
        self.identity = f"simulator-{env_id}-{tokenizer.identity}"
        self._make = lambda: make_env(env_id, tile_size=tile_size, seed=0)
        self.envs: list[Any] = []
        self._tokens_by_state: dict[bytes, np.ndarray] = {}

    @classmethod
    def from_dataset(cls, env_id: str, tokenizer: Any, tokens: np.ndarray, states: np.ndarray, tile_size: int = 8) -> "SimulatorWorldModel":
        table = {np.asarray(t, dtype=np.int64).tobytes(): s for t, s in zip(tokens, states)}
        return cls(env_id, tokenizer, table, tile_size)

    def _set_state(self, env: Any, state: np.ndarray) -> None:
        from minigrid.core.grid import Grid
        from minigrid.core.world_object import WorldObj

        from envs.state import StateCodec

        base = env.unwrapped
        decoded = StateCodec(base.width, base.height).decode(state)
        base.grid, _ = Grid.decode(decoded.grid)
        base.agent_pos = decoded.agent_pos
        base.agent_dir = decoded.agent_dir
        base.carrying = WorldObj.decode(*decoded.carrying)
        base.step_count = 0

    def reset(self, context_tokens: torch.Tensor, context_actions: torch.Tensor) -> torch.Tensor:
        last = np.asarray(context_tokens)[:, -1].astype(np.int64)
        while len(self.envs) < len(last):
            self.envs.append(self._make())
        self.envs = self.envs[: len(last)]
        for env, tokens in zip(self.envs, last):
            state = self.states_by_tokens.get(tokens.tobytes())
            if state is None:
                raise KeyError("SimulatorWorldModel: a context frame that is not in its dataset table")
            self._set_state(env, state)
        return torch.as_tensor(last)

    def step(self, actions: torch.Tensor) -> ToyStep:
        from envs.state import state_from_env

        tokens, rewards, terminated, states = [], [], [], []
        for env, action in zip(self.envs, np.asarray(actions)):
            # Step the bare env and render only states never seen: rendering dominates the cost.
            _, reward, term, _, _ = env.unwrapped.step(int(action))
            state = env.codec.encode(state_from_env(env))
            key = state.tobytes()
            if key not in self._tokens_by_state:
                self._tokens_by_state[key] = self.tokenizer.encode(env.frame()[None])[0].numpy()
            tokens.append(self._tokens_by_state[key]), rewards.append(reward), terminated.append(term), states.append(state)
        return ToyStep(torch.as_tensor(np.stack(tokens)), torch.tensor(rewards, dtype=torch.float32), torch.tensor(terminated),
                       torch.as_tensor(np.stack(states).astype(np.int64)))
