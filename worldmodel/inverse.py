"""Inverse dynamics: (frame_t, frame_t+1) -> the actions that could have made that change.

A transition does not always name its action: in a full view a "forward" into a wall, a "pickup"
with nothing in front and a "done" all leave the frame as it was. So the model predicts a *set*:
for every action, whether the env, from this state, would have produced the next frame. Its
targets are exact: :func:`consistent_actions` puts the env into each transition's symbolic state,
steps every action and compares the frames. A transition is *identifiable* when exactly one action
fits (the frame changed, and only that action changes it so); the others are reported as their set.

Uses: labelling action-free video (:func:`label_actions`, VPT-style: where several actions fit,
any of them is a true label for a world model), and turning imagined frames into the actions that
make them. The training loop is :mod:`worldmodel.train_inverse`.

Frames are read as the tokenizer's tokens (one per tile when the patch is a tile), like the
dynamics model and the agents. Deterministic envs only: where the env moves things by itself
(Dynamic-Obstacles' balls) the frame after an action is not a function of the state and action,
and the consistent set says little.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.atomic import ArtifactError
from common.checkpoints import read_checkpoint

CHECKPOINT_FORMAT = "inverse-dynamics/1"


class InverseCheckpointError(ArtifactError, ValueError):
    """An inverse-dynamics checkpoint that cannot be used (missing, damaged, foreign, other tokenizer)."""


# ---------------------------------------------------------------------------------------------
# Exact targets from the env
# ---------------------------------------------------------------------------------------------


def action_outcomes(env: Any, state: np.ndarray, num_actions: int) -> np.ndarray:
    """The frame every action leads to from the symbolic ``state``: (A, H, W, 3) uint8.

    ``env`` is a reset :func:`envs.make.make_env` env of the dataset's id and view; it is put
    back into ``state`` before each action (:func:`envs.make.put_state`)."""
    from envs.make import put_state

    frames = []
    for action in range(num_actions):
        put_state(env, state)
        frames.append(env.step(action)[0])
    return np.stack(frames)


def consistent_actions(env: Any, states: np.ndarray, next_frames: np.ndarray, actions: np.ndarray,
                       num_actions: int) -> np.ndarray:
    """(N, A) bool: which actions lead from ``states`` (N, S) to ``next_frames`` (N, H, W, 3).

    The action taken (``actions`` (N,)) is always in its set (in a deterministic env it is anyway).
    States repeat a lot in random-policy data, so each distinct state is stepped once."""
    out = np.zeros((len(states), num_actions), dtype=bool)
    outcomes: dict[bytes, np.ndarray] = {}
    for i, state in enumerate(states):
        key = state.tobytes()
        if key not in outcomes:
            outcomes[key] = action_outcomes(env, state, num_actions)
        out[i] = (outcomes[key] == next_frames[i][None]).reshape(num_actions, -1).all(-1)
    out[np.arange(len(states)), actions] = True
    return out


def transitions_of(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flat frame indices t of every transition t -> t + 1 of a dataset, and its actions."""
    actions = np.asarray(dataset.arrays["actions"])
    index = np.flatnonzero(actions >= 0)
    return index, actions[index]


def dataset_targets(dataset: Any, env: Any, num_actions: int) -> tuple[np.ndarray, np.ndarray]:
    """(transition indices (N,), consistent sets (N, A)) of a dataset, from its symbolic states."""
    index, actions = transitions_of(dataset)
    sets = consistent_actions(env, dataset.arrays["states"][index], dataset.arrays["frames"][index + 1],
                              actions, num_actions)
    return index, sets


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass
class InverseConfig:
    vocab_size: int
    grid_height: int
    grid_width: int
    num_actions: int
    dim: int = 32
    hidden: int = 256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "InverseConfig":
        return cls(**{k: values[k] for k in cls.__dataclass_fields__})


@dataclass
class Inference:
    """What the model says of a batch of transitions."""

    action: torch.Tensor  # (B,) int64: the most likely action
    possible: torch.Tensor  # (B, A) bool: every action it judges consistent (never empty)
    identifiable: torch.Tensor  # (B,) bool: exactly one action is possible


class InverseDynamics(nn.Module):
    """Both frames' token embeddings and a changed-here bit, mixed per cell, flattened, then an MLP
    to one logit per action (is this action consistent with the pair?).

    A cell's change alone is ambiguous (the agent's old and new tile both change); its position
    embedding and the flattened read-out let the head see the whole move, and the unchanged cells
    in front of the agent (a wall, nothing to pick up) are what say which actions do nothing."""

    def __init__(self, config: InverseConfig):
        super().__init__()
        self.config = c = config
        cells = c.grid_height * c.grid_width
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.position = nn.Parameter(torch.zeros(cells, c.dim))
        self.cell = nn.Sequential(nn.Linear(2 * c.dim + 1, 2 * c.dim), nn.GELU(), nn.Linear(2 * c.dim, c.dim))
        self.head = nn.Sequential(nn.LayerNorm(cells * c.dim), nn.Linear(cells * c.dim, c.hidden), nn.GELU(),
                                  nn.Linear(c.hidden, c.num_actions))
        nn.init.normal_(self.position, std=0.02)

    def check(self, tokens: torch.Tensor, what: str = "tokens") -> None:
        c = self.config
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (c.grid_height, c.grid_width):
            raise ValueError(f"inverse dynamics: {what} must be (B, {c.grid_height}, {c.grid_width}) token grids, "
                             f"got {tuple(tokens.shape)} (a frame of another env or view?)")

    def forward(self, tokens: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """tokens, next_tokens (B, h, w) int64 -> logits (B, A)."""
        self.check(tokens, "tokens")
        self.check(next_tokens, "next_tokens")
        now, after = tokens.flatten(1), next_tokens.flatten(1)
        changed = (now != after).float()[..., None]
        x = self.cell(torch.cat([self.embed(now), self.embed(after), changed], -1)) + self.position
        return self.head(x.flatten(1))

    def loss(self, tokens: torch.Tensor, next_tokens: torch.Tensor, possible: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of every action's logit against its consistency (B, A) bool."""
        return F.binary_cross_entropy_with_logits(self(tokens, next_tokens), possible.float())

    @torch.no_grad()
    def infer(self, tokens: torch.Tensor, next_tokens: torch.Tensor) -> Inference:
        logits = self(tokens, next_tokens)
        action = logits.argmax(-1)
        possible = logits > 0
        possible[torch.arange(len(action)), action] = True  # the most likely action is always possible
        return Inference(action=action, possible=possible, identifiable=possible.sum(-1) == 1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Metrics and labelling
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: InverseDynamics, tokens: np.ndarray, next_tokens: np.ndarray, possible: np.ndarray,
             batch_size: int = 1024) -> dict[str, float]:
    """Against exact sets ``possible`` (N, A): ``accuracy_identifiable`` (the action is right where
    exactly one fits), ``noop_set_exact`` (the predicted set is the true set where the frame did
    not change), ``set_exact`` (over all), and the share of each kind."""
    model.eval()
    device = next(model.parameters()).device
    action, predicted = [], []
    for i in range(0, len(tokens), batch_size):
        out = model.infer(torch.as_tensor(tokens[i:i + batch_size], device=device).long(),
                          torch.as_tensor(next_tokens[i:i + batch_size], device=device).long())
        action.append(out.action.cpu().numpy())
        predicted.append(out.possible.cpu().numpy())
    action_a, predicted_a = np.concatenate(action), np.concatenate(predicted)
    identifiable = possible.sum(-1) == 1
    unchanged = (tokens == next_tokens).reshape(len(tokens), -1).all(-1)
    set_exact = (predicted_a == possible).all(-1)
    truth = possible.argmax(-1)

    def share(values: np.ndarray, where: np.ndarray) -> float:
        return float(values[where].mean()) if where.any() else float("nan")

    return {
        "accuracy_identifiable": share(action_a == truth, identifiable),
        "noop_set_exact": share(set_exact, unchanged),
        "set_exact": float(set_exact.mean()) if len(set_exact) else float("nan"),
        "identifiable_fraction": float(identifiable.mean()) if len(identifiable) else float("nan"),
        "unchanged_fraction": float(unchanged.mean()) if len(unchanged) else float("nan"),
        "transitions": int(len(tokens)),
    }


@torch.no_grad()
def label_actions(model: InverseDynamics, tokens: np.ndarray, has_next: np.ndarray,
                  batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Actions for the frames ``tokens`` (F, h, w) of action-free video, ``has_next`` (F,) True at
    every frame t followed by a frame t + 1 of the same episode -> (labels (F,) int64, -1 where no
    frame follows; identifiable (F,) bool). Where several actions fit, the label is the most likely
    of them: any action of the set makes that transition, so it is a true label for a world model."""
    device = next(model.parameters()).device
    model.eval()
    labels = np.full(len(tokens), -1, dtype=np.int64)
    identifiable = np.zeros(len(tokens), dtype=bool)
    index = np.flatnonzero(has_next)
    for i in range(0, len(index), batch_size):
        part = index[i:i + batch_size]
        out = model.infer(torch.as_tensor(tokens[part], device=device).long(),
                          torch.as_tensor(tokens[part + 1], device=device).long())
        labels[part] = out.action.cpu().numpy()
        identifiable[part] = out.identifiable.cpu().numpy()
    return labels, identifiable


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def inverse_checkpoint(model: InverseDynamics, tokenizer_identity: str, **extra: Any) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "tokenizer_identity": str(tokenizer_identity),
        **extra,
    }


def load_inverse(path: Any, tokenizer_identity: str | None = None,
                 device: str | torch.device = "cpu") -> tuple[InverseDynamics, dict[str, Any]]:
    """Load ``inverse.pt`` -> (model in eval mode, the checkpoint dict); a tokenizer other than the
    one it was trained on raises :class:`InverseCheckpointError` naming both."""
    from pathlib import Path

    path = Path(path)
    checkpoint = read_checkpoint(path, "inverse dynamics", InverseCheckpointError, CHECKPOINT_FORMAT,
                                 "run scripts/train_inverse.py")
    if tokenizer_identity is not None and checkpoint["tokenizer_identity"] != tokenizer_identity:
        raise InverseCheckpointError(
            f"inverse dynamics model {path} was trained on tokenizer {checkpoint['tokenizer_identity']}, "
            f"but the tokenizer given is {tokenizer_identity}: retrain it for this tokenizer")
    model = InverseDynamics(InverseConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint
