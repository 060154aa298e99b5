"""Model-free PPO baseline on the real env: the config, the actor-critic and the saved policy.

The policy reads what the Dreamer actor reads: the tokens (B, h, w) of the current RGB frame, one
token per grid tile, from the run's tokenizer. Its network is the Dreamer actor's
(:class:`agents.dreamer.TokenEncoder`, then a two-layer head), with as many logits as the env has
actions (Dynamic-Obstacles has 3); the critic is the same shape with its own encoder. The GAE,
advantage whitening and clipped loss are :mod:`agents.rl`'s. The loop is :mod:`agents.train_ppo`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agents.dreamer import TokenEncoder
from agents.policy import TokenActorPolicy, register_policy
from agents.rl import Losses, masked_whiten, ppo_loss
from common.config import param


@dataclass
class PPOConfig:
    """Model-free PPO on the real env (section ``ppo``)."""

    # --- networks (the Dreamer actor's shape)
    embed_dim: int = param(16, "token embedding width", min=1)
    channels: int = param(32, "conv channels of the token encoder", min=1)
    hidden_dim: int = param(128, "MLP width of actor and critic", min=1)
    # --- rollouts
    total_env_steps: int = param(30_000, "real env steps to train for, summed over envs and ranks", min=1)
    num_envs: int = param(8, "envs in each process's gymnasium vector env", min=1)
    rollout_steps: int = param(64, "steps per env between updates", min=1)
    # --- returns and advantages
    gamma: float = param(0.99, "discount per step", min=0, max=1)
    gae_lambda: float = param(0.95, "λ of the generalised advantage estimate", min=0, max=1)
    # --- optimisation
    epochs: int = param(8, "passes over each rollout", min=1)
    minibatches: int = param(4, "minibatches per pass (must divide num_envs * rollout_steps)", min=1)
    lr: float = param(1e-3, "Adam learning rate at the first update (linear decay to lr_final)", above=0)
    lr_final: float = param(1e-4, "learning rate at the last update", min=0)
    clip: float = param(0.2, "PPO ratio clip", above=0, below=1)
    value_coef: float = param(0.5, "weight of the value loss", min=0)
    entropy_coef: float = param(0.01, "entropy bonus weight", min=0)
    grad_clip: float = param(0.5, "global gradient-norm clip", above=0)
    advantage_std_floor: float = param(0.05, "advantages are divided by max(std, floor): a rollout without a success "
                                       "(advantages are critic noise) is not blown up to unit scale", min=0)
    # --- tokens, evaluation, acting, saving
    tokenizer: str = param("", "run folder whose tokenizer.pt makes the tokens (default: this run)")
    eval_every: int = param(4, "evaluate the policy in the real env every N updates (0: only at the end)", min=0)
    eval_episodes: int = param(64, "episodes per evaluation (env seeds evaluate.seed + i; not counted as training steps)",
                               min=1)
    act_mode: str = param("sample", "how the saved policy acts: sample (from its distribution) or greedy (argmax)",
                          choices=("sample", "greedy"))
    checkpoint_every: int = param(20, "save a resume checkpoint every N updates", min=1)
    log_every: int = param(1, "log scalars every N updates", min=1)

    @property
    def batch_size(self) -> int:
        """Transitions per update and process."""
        return self.num_envs * self.rollout_steps


def check_config(cfg: Any) -> None:
    """What the fields' bounds cannot say; each error names its key."""
    batch = int(cfg.num_envs) * int(cfg.rollout_steps)
    if batch % int(cfg.minibatches):
        raise ValueError(f"ppo.minibatches: must divide num_envs * rollout_steps ({batch}), got {cfg.minibatches}")
    if float(cfg.lr_final) > float(cfg.lr):
        raise ValueError(f"ppo.lr_final: must not exceed ppo.lr ({cfg.lr}), got {cfg.lr_final}")


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class TokenActor(nn.Module):
    """Tokens (B, h, w) -> action logits (B, num_actions): the Dreamer actor with the env's action count.

    The last layer starts small (CleanRL's 0.01 gain): the first rollouts are near uniform, so the
    first updates are not spent undoing an arbitrary initial preference.
    """

    def __init__(self, encoder: TokenEncoder, hidden_dim: int, num_actions: int):
        super().__init__()
        self.encoder = encoder
        self.num_actions = int(num_actions)
        self.head = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
                                  _orthogonal(nn.Linear(hidden_dim, num_actions), 0.01))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(tokens))


class TokenCritic(nn.Module):
    """Tokens (B, h, w) -> state value (B,)."""

    def __init__(self, encoder: TokenEncoder, hidden_dim: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), _orthogonal(nn.Linear(hidden_dim, 1), 1.0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(tokens)).squeeze(-1)


def _encoder(cfg: PPOConfig, vocab_size: int, grid_shape: tuple[int, int]) -> TokenEncoder:
    return TokenEncoder(vocab_size, grid_shape[0], grid_shape[1], cfg.embed_dim, cfg.channels, cfg.hidden_dim)


def build_actor(cfg: PPOConfig, vocab_size: int, grid_shape: tuple[int, int], num_actions: int) -> TokenActor:
    return TokenActor(_encoder(cfg, vocab_size, grid_shape), cfg.hidden_dim, num_actions)


@dataclass
class RolloutBatch:
    """Transitions for one PPO minibatch, flat over (env, step).

    tokens (M, h, w) int64; actions, old_logprobs, advantages, returns (M,).
    """

    tokens: torch.Tensor
    actions: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


class ActorCritic(nn.Module):
    """Actor and critic on tokens (they share nothing); :meth:`compute_loss` is PPO's clipped loss."""

    def __init__(self, cfg: PPOConfig, vocab_size: int, grid_shape: tuple[int, int], num_actions: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = int(vocab_size)
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self.num_actions = int(num_actions)
        self.actor = build_actor(cfg, vocab_size, self.grid_shape, num_actions)
        self.critic = TokenCritic(_encoder(cfg, vocab_size, self.grid_shape), cfg.hidden_dim)

    @torch.no_grad()
    def act(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, h, w) tokens -> sampled actions (B,) int64, their log-probs (B,), values (B,)."""
        logits = self.actor(tokens)
        probs = F.softmax(logits.float(), dim=-1)
        actions = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        logprobs = F.log_softmax(logits, dim=-1).gather(-1, actions[:, None]).squeeze(-1)
        return actions, logprobs, self.critic(tokens)

    def compute_loss(self, batch: RolloutBatch) -> Losses:
        """Clipped PPO loss on one minibatch; advantages are whitened over the minibatch (CleanRL), with
        a floor under their spread."""
        cfg = self.cfg
        logits = self.actor(batch.tokens)
        log_probs = F.log_softmax(logits, dim=-1)
        logprobs = log_probs.gather(-1, batch.actions[:, None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        values = self.critic(batch.tokens)
        mask = torch.ones_like(logprobs)
        advantages = masked_whiten(batch.advantages, mask, std_floor=cfg.advantage_std_floor)
        return ppo_loss(logprobs[None], batch.old_logprobs[None], advantages[None], values[None], batch.returns[None],
                        entropy[None], mask[None], clip=cfg.clip, value_coef=cfg.value_coef, entropy_coef=cfg.entropy_coef)

    def forward(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """``compute_loss`` as ``forward``, so DistributedDataParallel sees (and averages) the gradients."""
        losses = self.compute_loss(batch)
        return losses.total, losses.parts


def linear_schedule(start: float, end: float, progress: float) -> float:
    """``start`` at progress 0, ``end`` at 1, linear between (progress is clamped to [0, 1])."""
    progress = min(max(progress, 0.0), 1.0)
    return (1 - progress) * start + progress * end


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var(target - predicted) / Var(target); nan when the target is constant."""
    variance = float(target.var())
    return float("nan") if variance == 0 or math.isnan(variance) else 1 - float((target - predicted).var()) / variance


# ---------------------------------------------------------------------------------------------
# The saved policy
# ---------------------------------------------------------------------------------------------


@register_policy("ppo")
class PPOPolicy(TokenActorPolicy):
    """The trained PPO actor as a :class:`~agents.policy.Policy`: acts on ``tokens`` (B, h, w).

    ``mode``: ``sample`` draws from the actor's distribution with the policy's own generator (so
    ``reset(seed=...)`` makes episodes reproducible), ``greedy`` takes the most likely action.
    ``tokenizer_identity`` names the tokenizer whose tokens it was trained on (the evaluator
    refuses tokens from another one).
    """

    def __init__(self, actor: TokenActor, config: PPOConfig, grid_shape: tuple[int, int], mode: str = "sample",
                 tokenizer_identity: str = "", env_id: str = "", name: str = "ppo", training_step: int = 0,
                 env_steps: int = 0, device: str = "cpu"):
        super().__init__(name)
        if mode not in ("sample", "greedy"):
            raise ValueError(f"ppo policy mode must be sample or greedy, got '{mode}'")
        self.actor = actor.to(device).eval()
        self.config = config
        self.grid_shape = tuple(grid_shape)
        self.mode = mode
        self.tokenizer_identity = tokenizer_identity
        self.env_id = env_id
        self.training_step = int(training_step)
        self.env_steps = int(env_steps)
        self.device = device

    def checkpoint(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config), "vocab_size": self.actor.encoder.vocab_size, "grid_shape": list(self.grid_shape),
            "num_actions": self.actor.num_actions, "actor": {k: v.cpu() for k, v in self.actor.state_dict().items()},
            "mode": self.mode, "tokenizer_identity": self.tokenizer_identity, "env_id": self.env_id,
            "training_step": self.training_step, "env_steps": self.env_steps,
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], device: str = "cpu") -> "PPOPolicy":
        for key in ("config", "vocab_size", "grid_shape", "num_actions", "actor"):
            if key not in checkpoint:
                raise ValueError(f"ppo checkpoint lacks '{key}': not written by agents.train_ppo?")
        known = set(PPOConfig.__dataclass_fields__)
        config = PPOConfig(**{k: v for k, v in checkpoint["config"].items() if k in known})
        grid_shape = tuple(checkpoint["grid_shape"])
        actor = build_actor(config, int(checkpoint["vocab_size"]), grid_shape, int(checkpoint["num_actions"]))  # type: ignore[arg-type]
        actor.load_state_dict(checkpoint["actor"])
        return cls(actor, config, grid_shape, mode=checkpoint.get("mode", config.act_mode),  # type: ignore[arg-type]
                   tokenizer_identity=checkpoint.get("tokenizer_identity", ""), env_id=checkpoint.get("env_id", ""),
                   name=checkpoint.get("name", "ppo"), training_step=checkpoint.get("training_step", 0),
                   env_steps=checkpoint.get("env_steps", 0), device=device)
