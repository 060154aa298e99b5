"""Credit assignment of the VAGEN-style agent, on the shared :mod:`agents.rl` (GAE, whitening, PPO loss).

Two streams of reward reach a response's tokens:

- the task reward, through bi-level GAE (VAGEN: turn-level GAE across turns, then token-level GAE
  inside each turn) or turn-level GAE only (every token of a turn gets the turn's advantage);
- the world-modeling reward (or the format penalty), each turn on its own: a well-formed
  response's field tokens each get their own field's share, a malformed one's tokens (its
  too-early action included) the penalty. It has a value stream of its own.

Pure functions on tensors, plus the critic's return normaliser.
"""

from __future__ import annotations

import torch

from agents.rl import gae


def _last_token_index(mask: torch.Tensor) -> torch.Tensor:
    lengths = mask.sum(-1).long()
    if (lengths < 1).any():
        raise ValueError("every turn needs at least one valid token (mask row of zeros found)")
    return lengths - 1


def bilevel_gae(
    rewards: torch.Tensor,
    dones: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    last_value: torch.Tensor,
    *,
    turn_gamma: float,
    turn_lambda: float,
    token_gamma: float,
    token_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bi-level GAE (VAGEN): turn-level GAE across turns, then token-level GAE inside each turn.

    rewards, dones: (N, T) per turn; values: (N, T, L) the critic's value before each response
    token; mask: (N, T, L) valid response tokens (a prefix of each row, at least one);
    last_value: (N,) the turn value after the last turn.

    1. A turn's value is the value at its last token; turn-level GAE with ``turn_gamma``,
       ``turn_lambda`` over the turn rewards gives the turn advantage ``A_t``.
    2. Inside turn t the last token's advantage is ``A_t`` (its "reward" is the turn return
       ``A_t + V_t`` with nothing after it); earlier tokens get no reward, so
       ``delta_i = token_gamma * V_{i+1} - V_i`` and ``A_i = delta_i + token_gamma * token_lambda * A_{i+1}``.

    With one token per turn this is ordinary GAE. Returns (advantages (N, T, L), returns
    (N, T, L) = advantages + values, both zero off the mask; turn advantages (N, T)).
    """
    mask = mask.to(values.dtype)
    last = _last_token_index(mask)
    turn_values = values.gather(-1, last.unsqueeze(-1)).squeeze(-1)
    turn_adv, _ = gae(rewards, dones, turn_values, last_value, turn_gamma, turn_lambda)
    N, T, L = values.shape
    advantages = torch.zeros_like(values)
    next_adv = torch.zeros(N, T, dtype=values.dtype)
    positions = torch.arange(L)
    for i in reversed(range(L)):
        next_value = values[..., i + 1] if i + 1 < L else torch.zeros(N, T, dtype=values.dtype)
        inner = token_gamma * next_value - values[..., i] + token_gamma * token_lambda * next_adv
        adv_i = torch.where(last == positions[i], turn_adv, inner) * mask[..., i]
        advantages[..., i] = adv_i
        next_adv = adv_i
    returns = (advantages + values) * mask
    return advantages, returns, turn_adv


def turn_level_advantages(
    rewards: torch.Tensor,
    dones: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    last_value: torch.Tensor,
    *,
    turn_gamma: float,
    turn_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn-level-only GAE (the comparison): every token of turn t gets the turn advantage ``A_t``
    and the turn return as its value target. Shapes as :func:`bilevel_gae`."""
    mask = mask.to(values.dtype)
    last = _last_token_index(mask)
    turn_values = values.gather(-1, last.unsqueeze(-1)).squeeze(-1)
    turn_adv, turn_ret = gae(rewards, dones, turn_values, last_value, turn_gamma, turn_lambda)
    return turn_adv.unsqueeze(-1) * mask, turn_ret.unsqueeze(-1) * mask, turn_adv


def task_advantages(
    rewards: torch.Tensor,
    dones: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    last_value: torch.Tensor,
    *,
    advantage: str,
    turn_gamma: float,
    turn_lambda: float,
    token_gamma: float,
    token_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (N, T, L) of the turn rewards (N, T): ``advantage`` is ``bilevel``
    (:func:`bilevel_gae`) or ``turn`` (:func:`turn_level_advantages`)."""
    if advantage == "bilevel":
        advantages, returns, _ = bilevel_gae(
            rewards, dones, values, mask, last_value,
            turn_gamma=turn_gamma, turn_lambda=turn_lambda, token_gamma=token_gamma, token_lambda=token_lambda,
        )
    elif advantage == "turn":
        advantages, returns, _ = turn_level_advantages(rewards, dones, values, mask, last_value, turn_gamma=turn_gamma, turn_lambda=turn_lambda)
    else:
        raise ValueError(f"advantage must be 'bilevel' or 'turn', got '{advantage}'")
    return advantages, returns


def world_model_advantages(
    rewards: torch.Tensor,
    slot_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    tokens: torch.Tensor,
    well_formed: torch.Tensor,
    first_action: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The world-modeling stream: each turn on its own (a turn's estimate does not change later
    turns' accuracy), each credited token's return its own reward, advantage ``r_i - V_i``.

    A well-formed response credits the tokens before its action, each with its own slot's share
    (``slot_rewards``); the action is not credited (it answers to the task alone). A malformed
    response credits every token, the action included (writing it early is what broke the
    format), with the turn's reward, the format penalty. The same under bi-level and turn-level
    GAE: with discount 0 across turns there is nothing for them to spread.
    rewards, well_formed (N, T); slot_rewards, values, mask, tokens (N, T, L) -> advantages and
    returns (N, T, L), zero off the credited tokens, and their mask (N, T, L)."""
    is_action = tokens >= first_action
    credited = mask & (~is_action | ~well_formed.unsqueeze(-1))
    returns = torch.where(well_formed.unsqueeze(-1) & ~is_action, slot_rewards, rewards.unsqueeze(-1).to(values.dtype))
    keep = credited.to(values.dtype)
    return (returns - values) * keep, returns * keep, credited


class ValueNormalizer:
    """The critic predicts returns in normalised units (running mean and std of the value targets),
    so its output scale does not depend on how dense a reward is. The std has a floor
    (``std_floor``, in reward units): where nearly every return is the same (no success yet, every
    response right), a rare return would otherwise land hundreds of stds away."""

    def __init__(self, momentum: float = 0.9, std_floor: float = 1e-3):
        self.momentum, self.std_floor = momentum, std_floor
        self.mean, self.std, self.initialised = 0.0, 1.0, False

    def update(self, targets: torch.Tensor) -> None:
        """Move the running statistics towards those of ``targets`` (1-D)."""
        mean, std = float(targets.mean()), float(targets.std().clamp_min(self.std_floor)) if targets.numel() > 1 else 1.0
        if not self.initialised:
            self.mean, self.std, self.initialised = mean, std, True
        else:
            self.mean = self.momentum * self.mean + (1 - self.momentum) * mean
            self.std = self.momentum * self.std + (1 - self.momentum) * std

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / self.std

    def denormalize(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.std + self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "initialised": self.initialised}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.std, self.initialised = float(state["mean"]), float(state["std"]), bool(state["initialised"])
