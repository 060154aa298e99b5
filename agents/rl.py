"""Policy-gradient pieces shared by every on-policy learner in the repo (the PPO baseline, the
VAGEN agent's bi-level credit assignment): GAE along time, masked advantage whitening, and the
clipped PPO loss with a validity mask.

Shapes are explicit in each docstring; nothing here knows about envs, networks or configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def gae(
    rewards: torch.Tensor, dones: torch.Tensor, values: torch.Tensor, last_value: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordinary GAE along time. rewards, dones, values: (N, T); last_value: (N,) the value after
    the last step (ignored where that step ended the episode). ``dones[:, t]`` means the episode
    ended with step t (no bootstrap across it). Returns advantages and returns, both (N, T)."""
    N, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(N, dtype=rewards.dtype)
    for t in reversed(range(T)):
        next_value = last_value if t == T - 1 else values[:, t + 1]
        alive = 1.0 - dones[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value * alive - values[:, t]
        running = delta + gamma * lam * alive * running
        advantages[:, t] = running
    return advantages, advantages + values


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, per_position: bool = False, std_floor: float = 0.0
) -> torch.Tensor:
    """(values - mean) / max(std, std_floor) over the masked entries; zero off the mask. values,
    mask: (..., L); ``per_position`` whitens each response position (last axis) on its own
    statistics. The floor keeps a rollout with nearly equal advantages (every response right, no
    task reward: what is left is the critic's error) from being blown up to unit scale."""
    mask = mask.to(values.dtype)
    dims = tuple(range(values.dim() - 1)) if per_position else tuple(range(values.dim()))
    count = mask.sum(dims, keepdim=True).clamp_min(1.0)
    mean = (values * mask).sum(dims, keepdim=True) / count
    var = (((values - mean) * mask) ** 2).sum(dims, keepdim=True) / count
    return (values - mean) * torch.rsqrt(torch.clamp(var, min=std_floor**2) + eps) * mask


@dataclass
class Losses:
    """A total to minimise plus named parts (become log keys)."""

    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float,
    value_coef: float,
    entropy_coef: float,
    value_mask: torch.Tensor | None = None,
    huber_delta: float = 0.0,
) -> Losses:
    """Clipped PPO on token log-probs; every argument is (M, L) and ``mask`` picks the response
    tokens; means are over valid tokens (each token one decision). With several value streams
    ``values`` and ``returns`` are (M, L, S) and ``value_mask`` (M, L, S) picks each stream's
    tokens; the value loss is summed over the streams. ``huber_delta`` > 0: the value loss is the
    Huber loss (squared within delta, linear beyond), so one surprising return moves the critic,
    and a trunk it shares with the policy, no more than an error of delta would; 0: squared error."""
    mask = mask.to(logprobs.dtype)
    count = mask.sum().clamp_min(1.0)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    policy_loss = -(torch.minimum(unclipped, clipped) * mask).sum() / count
    if value_mask is None:
        value_mask = mask if values.dim() == mask.dim() else mask.unsqueeze(-1).expand_as(values)
    if huber_delta > 0:
        errors = torch.nn.functional.huber_loss(values, returns, reduction="none", delta=huber_delta)
    else:
        errors = 0.5 * (values - returns) ** 2
    value_loss = (errors * value_mask.to(values.dtype)).sum() / count
    entropy_mean = (entropy * mask).sum() / count
    total = policy_loss + value_coef * value_loss - entropy_coef * entropy_mean
    with torch.no_grad():
        approx_kl = (((ratio - 1) - (logprobs - old_logprobs)) * mask).sum() / count
        clip_fraction = (((ratio - 1).abs() > clip).to(mask.dtype) * mask).sum() / count
    return Losses(
        total,
        {
            "policy": policy_loss.item(),
            "value": value_loss.item(),
            "entropy": entropy_mean.item(),
            "approx_kl": float(approx_kl),
            "clip_fraction": float(clip_fraction),
        },
    )
