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

The model reads frames (pixels, tile by tile), not tokens: it needs no tokenizer, so it labels
video from any source of the env's frames. Deterministic envs only: where the env moves things by itself
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
    """An inverse-dynamics checkpoint that cannot be used (missing, damaged, foreign)."""


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
    tile_size: int
    grid_height: int
    grid_width: int
    num_actions: int
    dim: int = 32
    layers: int = 2
    hidden: int = 128

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
    """Both frames' pixels, tile by tile, and a changed-here bit per tile, then 3x3 convolutions over
    the grid, max- and mean-pooling over tiles and an MLP to one logit per action (is this action
    consistent with the pair?).

    It reads pixels, not the tokenizer's ids: the agent's triangle points the same way on a floor,
    an open door or a goal tile, and a token id would make each of those its own case to learn (ids
    missed left from right on tiles rare in training). What names an action is local to the agent,
    and what makes the others do nothing is too (a wall or nothing in front), but where that is
    differs per layout: convolutions and pooling see it anywhere, with the same weights on any grid
    size. Max-pooling also carries the few global facts (no key left on the floor: it is carried)."""

    def __init__(self, config: InverseConfig):
        super().__init__()
        self.config = c = config
        pixels = c.tile_size * c.tile_size * 3
        self.tile = nn.Sequential(nn.Linear(2 * pixels + 1, 2 * c.dim), nn.GELU(), nn.Linear(2 * c.dim, c.dim))
        self.convs = nn.ModuleList(nn.Conv2d(c.dim, c.dim, 3, padding=1) for _ in range(c.layers))
        self.head = nn.Sequential(nn.Linear(2 * c.dim, c.hidden), nn.GELU(), nn.Linear(c.hidden, c.num_actions))

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        c = self.config
        return c.grid_height * c.tile_size, c.grid_width * c.tile_size, 3

    def check(self, frames: torch.Tensor, what: str = "frames") -> None:
        if frames.dim() != 4 or tuple(frames.shape[1:]) != self.frame_shape:
            raise ValueError(f"inverse dynamics: {what} must be (B, {', '.join(map(str, self.frame_shape))}) uint8 "
                             f"frames, got {tuple(frames.shape)} (a frame of another env or view?)")

    def _tiles(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, h, w, t * t * 3) in [0, 1]."""
        c = self.config
        b, t = frames.shape[0], c.tile_size
        x = frames.reshape(b, c.grid_height, t, c.grid_width, t, 3).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, c.grid_height, c.grid_width, -1).float() / 255.0

    def forward(self, frames: torch.Tensor, next_frames: torch.Tensor) -> torch.Tensor:
        """frames, next_frames (B, H, W, 3) uint8 -> logits (B, A)."""
        self.check(frames, "frames")
        self.check(next_frames, "next_frames")
        now, after = self._tiles(frames), self._tiles(next_frames)
        changed = (now != after).any(-1, keepdim=True).float()
        x = self.tile(torch.cat([now, after, changed], -1)).permute(0, 3, 1, 2)  # (B, d, h, w)
        for conv in self.convs:
            x = x + conv(F.gelu(x))
        x = x.flatten(2)
        return self.head(torch.cat([x.amax(-1), x.mean(-1)], -1))

    def loss(self, frames: torch.Tensor, next_frames: torch.Tensor, possible: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of every action's logit against its consistency (B, A) bool."""
        return F.binary_cross_entropy_with_logits(self(frames, next_frames), possible.float())

    @torch.no_grad()
    def infer(self, frames: Any, next_frames: Any) -> Inference:
        """frames, next_frames (B, H, W, 3) uint8 (arrays or tensors) -> :class:`Inference`."""
        device = next(self.parameters()).device
        logits = self(torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames, device=device),
                      torch.as_tensor(np.asarray(next_frames) if not torch.is_tensor(next_frames) else next_frames,
                                      device=device))
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
def evaluate(model: InverseDynamics, frames: np.ndarray, next_frames: np.ndarray, possible: np.ndarray,
             batch_size: int = 512) -> dict[str, float]:
    """Against exact sets ``possible`` (N, A): ``accuracy_identifiable`` (the action is right where
    exactly one fits), ``noop_set_exact`` (the predicted set is the true one where the frame did
    not change), ``set_exact`` (over all), and the share of each kind."""
    model.eval()
    action, predicted = [], []
    for i in range(0, len(frames), batch_size):
        out = model.infer(frames[i:i + batch_size], next_frames[i:i + batch_size])
        action.append(out.action.cpu().numpy())
        predicted.append(out.possible.cpu().numpy())
    action_a, predicted_a = np.concatenate(action), np.concatenate(predicted)
    identifiable = possible.sum(-1) == 1
    unchanged = (frames == next_frames).reshape(len(frames), -1).all(-1)
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
        "transitions": int(len(frames)),
    }


@torch.no_grad()
def label_actions(model: InverseDynamics, frames: np.ndarray, has_next: np.ndarray,
                  batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Actions for the frames (F, H, W, 3) of action-free video, ``has_next`` (F,) True at every
    frame t followed by a frame t + 1 of the same episode -> (labels (F,) int64, -1 where no frame
    follows; identifiable (F,) bool). Where several actions fit, the label is the most likely of
    them: any action of the set makes that transition, so it is a true label for a world model."""
    model.eval()
    labels = np.full(len(frames), -1, dtype=np.int64)
    identifiable = np.zeros(len(frames), dtype=bool)
    index = np.flatnonzero(has_next)
    for i in range(0, len(index), batch_size):
        part = index[i:i + batch_size]
        out = model.infer(frames[part], frames[part + 1])
        labels[part] = out.action.cpu().numpy()
        identifiable[part] = out.identifiable.cpu().numpy()
    return labels, identifiable


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def inverse_checkpoint(model: InverseDynamics, **extra: Any) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def load_inverse(path: Any, device: str | torch.device = "cpu") -> tuple[InverseDynamics, dict[str, Any]]:
    """Load ``inverse.pt`` -> (model in eval mode, the checkpoint dict)."""
    from pathlib import Path

    path = Path(path)
    checkpoint = read_checkpoint(path, "inverse dynamics", InverseCheckpointError, CHECKPOINT_FORMAT,
                                 "run scripts/train_inverse.py")
    model = InverseDynamics(InverseConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint
