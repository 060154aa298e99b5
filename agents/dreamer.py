"""Dreamer-style actor-critic trained only in imagination: models and pure functions.

The agent sees what the world model produces: the tokens of the current frame (B, h, w), one token
per grid tile. In the real env the same tokens come from the tokenizer on the real frame, so the
policy acts on the same input in both worlds (see :mod:`agents.policy`).

One update (the loop is in :mod:`agents.train_dreamer`):
  1. start B imagined rollouts from dataset frames taken all along the episodes;
  2. roll the frozen world model H steps with the actor (:func:`imagine`);
  3. λ-returns bootstrapped from the slow critic (:func:`lambda_returns`);
  4. advantages scaled by a running 5th-95th percentile range of the returns, floored at 1
     (:class:`ReturnNormalizer`, as DreamerV3: small returns are not blown up into noise);
  5. actor: REINFORCE with entropy bonus, or PMPO (the sign of the advantage, with a KL to the
     behaviour prior, as Dreamer 4); critic: regression to the λ-returns plus a pull towards the
     slow critic, which follows the critic by an exponential moving average.
Optionally the actor is first cloned from the dataset's actions (behaviour cloning warm start),
and the clone is kept frozen as the prior of the KL term (Dreamer 4's agent finetuning).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agents.policy import NUM_ACTIONS, PolicyInput, TokenActorPolicy, register_policy
from common.config import param

ACTOR_UPDATES = ("reinforce", "pmpo")
ACTOR_MEMORIES = ("auto", "none", "gru")


@dataclass
class DreamerConfig:
    """Dreamer-style agent trained in imagination (section ``dreamer``)."""

    # --- networks
    embed_dim: int = param(16, "token embedding width", min=1)
    channels: int = param(32, "conv channels of the token encoder", min=1)
    hidden_dim: int = param(128, "MLP width of actor and critic", min=1)
    actor_memory: str = param("none", "what the actor remembers: none (the current frame's tokens only), gru (a GRU over "
                              "its per-frame features and previous actions, carried through the episode) or auto (gru on "
                              "the egocentric view, none on the full one)", choices=ACTOR_MEMORIES)
    memory_dim: int = param(64, "GRU width of the recurrent actor (actor_memory=gru)", min=1)
    memory_burn_in: int = param(8, "actor_memory=gru: dataset frames before each imagined start that the actor reads "
                                "first, so its memory at the start holds what the episode showed", min=0)
    # --- imagination
    updates: int = param(1500, "actor-critic updates (each one imagined batch)", min=1)
    batch_size: int = param(64, "imagined rollouts per update, started from random dataset frames", min=1)
    horizon: int = param(15, "imagined steps per rollout", min=1)
    context_length: int = param(1, "real frames given to the world model before imagining (1: the start frame alone)",
                                min=1)
    near_reward_starts: float = param(0.25, "share of each batch started from dataset frames whose episode collected a "
                                      "reward within `horizon` steps (random data holds a handful of successes: "
                                      "without them, sparse-reward imagination rarely sees one)", min=0, max=1)
    doubt_penalty: float = param(0.0, "imagined reward minus this times the world model's doubt about the step "
                                 "(worldmodel.uncertainty; 0: off)", min=0)
    # --- returns and advantages
    discount: float = param(0.985, "discount per step (MiniGrid's reward already falls with steps; this adds pressure for short paths)",
                            min=0, max=1)
    lambda_: float = param(0.95, "λ of the λ-returns", min=0, max=1)
    return_norm_decay: float = param(0.99, "EMA decay of the 5th/95th return percentiles", min=0, max=1)
    return_norm_low: float = param(0.05, "lower percentile of the return range", min=0, max=1)
    return_norm_high: float = param(0.95, "upper percentile of the return range", min=0, max=1)
    return_norm_floor: float = param(1.0, "advantages are divided by max(floor, range): no blow-up of small returns",
                                     above=0)
    # --- actor
    actor_update: str = param("reinforce", "actor update: reinforce (advantage-weighted log-prob) or pmpo (sign of advantage + KL to prior)",
                              choices=ACTOR_UPDATES)
    entropy_coef: float = param(3e-3, "entropy bonus weight at the first update", min=0)
    entropy_coef_final: float = param(3e-4, "entropy bonus weight at the last update (linear decay: explore early, commit late)",
                                      min=0)
    pmpo_alpha: float = param(0.5, "PMPO: weight of the positive-advantage set (1 - alpha for the negative one)",
                              min=0, max=1)
    prior_kl_coef: float = param(0.3, "KL(policy || prior) weight: used by pmpo (uniform prior without BC) and by reinforce when bc_prior",
                                 min=0)
    bc_steps: int = param(0, "behaviour-cloning warm start: supervised steps on the dataset's actions before imagination",
                          min=0)
    bc_prior: bool = param(False, "keep the BC-initialised actor frozen as the prior of the KL term")
    bc_batch_size: int = param(256, "frames per behaviour-cloning step", min=1)
    # --- critic
    slow_critic_decay: float = param(0.98, "EMA decay of the slow critic that bootstraps the returns", min=0, max=1)
    slow_critic_reg: float = param(1.0, "weight of the critic's pull towards the slow critic", min=0)
    # --- optimisation
    actor_lr: float = param(1e-3, "actor learning rate (Adam)", above=0)
    critic_lr: float = param(2e-3, "critic learning rate (Adam)", above=0)
    grad_clip: float = param(10.0, "global gradient-norm clip per network", above=0)
    # --- acting, saving
    act_mode: str = param("sample", "how the saved policy acts: sample (from its distribution) or greedy (argmax)",
                          choices=("sample", "greedy"))
    checkpoint_every: int = param(50, "save the policy every N updates (evaluated as 'checkpoints along training')",
                                  min=1)
    log_every: int = param(25, "log scalars every N updates", min=1)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


class TokenEncoder(nn.Module):
    """Tokens (B, h, w) int64 -> features (B, hidden_dim): embedding, two 3x3 convs, MLP.

    Flattening keeps where each tile is (a goal top-left is not a goal bottom-right), so the
    network is built for one grid size ``(grid_height, grid_width)``.
    """

    def __init__(self, vocab_size: int, grid_height: int, grid_width: int, embed_dim: int, channels: int, hidden_dim: int):
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.convs = nn.Sequential(
            nn.Conv2d(embed_dim, channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
        )
        self.mlp = nn.Sequential(nn.Linear(channels * grid_height * grid_width, hidden_dim), nn.SiLU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.max() >= self.vocab_size or tokens.min() < 0:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got [{int(tokens.min())}, {int(tokens.max())}]")
        return self.grid_features(self.embed(tokens))

    def grid_features(self, embedded: torch.Tensor) -> torch.Tensor:
        """The convs and MLP on an embedded grid (B, h, w, e) -> (B, hidden_dim) (the VAGEN agent
        feeds it per-tile pixel embeddings instead of token embeddings)."""
        return self.mlp(self.convs(embedded.permute(0, 3, 1, 2)).flatten(1))


class Actor(nn.Module):
    """Tokens (B, h, w) -> action logits (B, num_actions): the env's action count."""

    def __init__(self, encoder: TokenEncoder, hidden_dim: int, num_actions: int = NUM_ACTIONS):
        super().__init__()
        self.encoder = encoder
        self.num_actions = int(num_actions)
        self.head = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, self.num_actions))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(tokens))


class RecurrentActor(nn.Module):
    """An actor with memory: a GRU over its per-frame features and the previous action.

    ``step(tokens (B, h, w), previous_actions (B,), state (B, m)) -> (logits (B, A), state)`` acts
    one frame at a time (the policy in the real env, the imagined rollout); ``sequence`` runs the
    same GRU over a whole (T, B) stretch at once (the loss). A previous action of -1 means none
    (the episode's first frame); an episode starts from :meth:`initial_state`. The head reads the
    frame's features beside the memory, so what is in view needs no remembering.
    """

    def __init__(self, encoder: TokenEncoder, hidden_dim: int, memory_dim: int, num_actions: int = NUM_ACTIONS):
        super().__init__()
        self.encoder = encoder
        self.num_actions = int(num_actions)
        self.memory_dim = int(memory_dim)
        self.action_embed = nn.Embedding(self.num_actions + 1, hidden_dim)  # row 0: no previous action
        self.gru = nn.GRU(hidden_dim, memory_dim)
        self.head = nn.Sequential(nn.Linear(hidden_dim + memory_dim, hidden_dim), nn.SiLU(),
                                  nn.Linear(hidden_dim, self.num_actions))

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros(batch_size, self.memory_dim, device=device)

    def sequence(self, tokens: torch.Tensor, previous_actions: torch.Tensor,
                 state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (T, B, h, w), previous_actions (T, B) (-1: none), state (B, m) before the first
        frame -> logits (T, B, A) and the state after each frame (T, B, m)."""
        steps, batch = previous_actions.shape
        features = self.encoder(tokens.flatten(0, 1)).view(steps, batch, -1)
        inputs = features + self.action_embed(previous_actions + 1)
        states, _ = self.gru(inputs, state[None].contiguous())
        return self.head(torch.cat([features, states], -1)), states

    def step(self, tokens: torch.Tensor, previous_actions: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame: tokens (B, h, w), previous_actions (B,), state (B, m) -> logits (B, A), new state (B, m)."""
        logits, states = self.sequence(tokens[None], previous_actions[None], state)
        return logits[0], states[0]

    @torch.no_grad()
    def burn_in(self, tokens: torch.Tensor, previous_actions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The state after reading real frames: tokens (B, K, h, w), previous_actions (B, K), valid
        (B, K) bool (False before the episode began: those frames are skipped) -> state (B, m)."""
        batch, length = valid.shape
        state = self.initial_state(batch, tokens.device)
        for k in range(length):
            _, after = self.step(tokens[:, k], previous_actions[:, k], state)
            state = torch.where(valid[:, k, None], after, state)
        return state

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        raise TypeError("the recurrent actor acts through step(tokens, previous_actions, state), not on tokens alone")


AnyActor = Actor | RecurrentActor


class Critic(nn.Module):
    """Tokens (B, h, w) -> state value (B,)."""

    def __init__(self, encoder: TokenEncoder, hidden_dim: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(tokens)).squeeze(-1)


def resolve_actor_memory(memory: str, obs: str) -> str:
    """``auto`` -> ``gru`` on the egocentric view (``env.obs=partial``: the view alone may not show
    what the episode did), ``none`` on the full view (the frame shows the state)."""
    if memory == "auto":
        return "gru" if obs == "partial" else "none"
    return memory


def build_actor(cfg: DreamerConfig, vocab_size: int, grid_shape: tuple[int, int], num_actions: int = NUM_ACTIONS) -> AnyActor:
    encoder = TokenEncoder(vocab_size, grid_shape[0], grid_shape[1], cfg.embed_dim, cfg.channels, cfg.hidden_dim)
    if cfg.actor_memory == "gru":
        return RecurrentActor(encoder, cfg.hidden_dim, cfg.memory_dim, num_actions)
    return Actor(encoder, cfg.hidden_dim, num_actions)


def build_critic(cfg: DreamerConfig, vocab_size: int, grid_shape: tuple[int, int]) -> Critic:
    encoder = TokenEncoder(vocab_size, grid_shape[0], grid_shape[1], cfg.embed_dim, cfg.channels, cfg.hidden_dim)
    return Critic(encoder, cfg.hidden_dim)


# ---------------------------------------------------------------------------------------------
# Returns, normalisation, losses (pure functions)
# ---------------------------------------------------------------------------------------------


def lambda_returns(
    rewards: torch.Tensor, continues: torch.Tensor, values: torch.Tensor, discount: float, lambda_: float
) -> torch.Tensor:
    """λ-returns of an imagined trajectory, computed backwards.

    rewards, continues: (T, B): reward of the action taken at step t, and 1 - terminated after it.
    values: (T + 1, B): value of the state at step t; ``values[T]`` bootstraps the horizon.
    Returns (T, B): ``R_t = r_t + γ c_t ((1 - λ) v_{t+1} + λ R_{t+1})`` with ``R_T = v_T``.
    """
    if values.shape[0] != rewards.shape[0] + 1:
        raise ValueError(f"values need one more step than rewards: {tuple(values.shape)} vs {tuple(rewards.shape)}")
    returns = torch.empty_like(rewards)
    next_return = values[-1]
    for t in reversed(range(rewards.shape[0])):
        next_return = rewards[t] + discount * continues[t] * ((1 - lambda_) * values[t + 1] + lambda_ * next_return)
        returns[t] = next_return
    return returns


def alive_weights(continues: torch.Tensor) -> torch.Tensor:
    """(T, B) continues -> (T, B) weights: 1 while the imagined episode has not ended before step t.

    ``weights[0] = 1``, ``weights[t] = prod_{k < t} continues[k]``: steps after a predicted
    termination are the model dreaming past the end, and must not train the agent.
    """
    ones = torch.ones_like(continues[:1])
    return torch.cumprod(torch.cat([ones, continues[:-1]], dim=0), dim=0)


class ReturnNormalizer(nn.Module):
    """Running percentile range of the λ-returns (DreamerV3): ``scale = max(floor, P95 - P5)``.

    Both percentiles follow exponential moving averages started at zero, so the scale grows as
    returns are seen; the floor keeps sparse, small returns from being amplified into noise.
    """

    def __init__(self, decay: float = 0.99, low: float = 0.05, high: float = 0.95, floor: float = 1.0):
        super().__init__()
        self.decay, self.low_q, self.high_q, self.floor = float(decay), float(low), float(high), float(floor)
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))

    @torch.no_grad()
    def update(self, returns: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Fold the percentiles of ``returns`` (any shape; entries with weight 0 are left out) in."""
        values = returns.flatten() if weights is None else returns.flatten()[weights.flatten() > 0]
        if values.numel() == 0:
            return
        low = torch.quantile(values.float(), self.low_q)
        high = torch.quantile(values.float(), self.high_q)
        self.low.mul_(self.decay).add_((1 - self.decay) * low)
        self.high.mul_(self.decay).add_((1 - self.decay) * high)

    def scale(self) -> torch.Tensor:
        return torch.clamp(self.high - self.low, min=self.floor)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(..., A) logits -> (...) entropy of the categorical distribution."""
    log_probs = F.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def kl_divergence(logits: torch.Tensor, prior_logits: torch.Tensor) -> torch.Tensor:
    """(..., A) -> (...) KL(policy || prior), the reverse KL Dreamer 4 uses for its prior."""
    log_p = F.log_softmax(logits, dim=-1)
    log_q = F.log_softmax(prior_logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp(min=1e-8)


def reinforce_loss(log_probs: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Advantage-weighted log-likelihood (advantages are constants): (T, B) each -> scalar."""
    return -weighted_mean(log_probs * advantages.detach(), weights)


def pmpo_loss(log_probs: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """PMPO: raise the log-probability of actions with positive advantage, lower those with negative.

    Only the sign of the advantage counts, so the update is immune to the return scale; each set
    is averaged on its own and weighted ``alpha`` / ``1 - alpha``. (T, B) each -> scalar.
    """
    positive = (advantages > 0).float() * weights
    negative = (advantages < 0).float() * weights
    loss = torch.zeros((), device=log_probs.device)
    if positive.sum() > 0:
        loss = loss - alpha * (log_probs * positive).sum() / positive.sum()
    if negative.sum() > 0:
        loss = loss + (1 - alpha) * (log_probs * negative).sum() / negative.sum()
    return loss


# ---------------------------------------------------------------------------------------------
# Imagination
# ---------------------------------------------------------------------------------------------


class ImaginationModel(Protocol):
    """What the agent needs of a world model (``worldmodel.imagine.WorldModel`` or a toy)."""

    def reset(self, context_tokens: torch.Tensor, context_actions: torch.Tensor) -> torch.Tensor: ...

    def step(self, actions: torch.Tensor) -> Any: ...


@dataclass
class Trajectory:
    """An imagined batch. tokens (T + 1, B, h, w); actions, rewards, continues (T, B); doubt (T, B)
    the world model's doubt about each step (None when it was not asked: no penalty); memory a
    recurrent actor's state at the start (None for an actor without memory, or an episode's start)."""

    tokens: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    continues: torch.Tensor
    doubt: torch.Tensor | None = None
    memory: "ActorMemory | None" = None


@dataclass
class ActorMemory:
    """Where a recurrent actor's imagined rollout starts: its state (B, m) after the real frames
    before the start, and the action (B,) that led to the start frame (-1: the episode's first)."""

    state: torch.Tensor
    previous_actions: torch.Tensor


def sample_actions(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, A) logits -> (B,) int64 actions drawn from the categorical distribution."""
    probs = F.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def imagine(
    world_model: ImaginationModel,
    actor: AnyActor,
    context_tokens: torch.Tensor,
    context_actions: torch.Tensor,
    horizon: int,
    generator: torch.Generator | None = None,
    doubt_penalty: float = 0.0,
    memory: ActorMemory | None = None,
) -> Trajectory:
    """Roll the (frozen) world model ``horizon`` steps with actions sampled from ``actor``.

    context_tokens (B, T0, h, w) int64 real frames' tokens; context_actions (B, T0 - 1) int64.
    No gradient flows through the model (its outputs are discrete): the actor learns from
    log-probabilities recomputed on the returned tokens in one batched pass (keeping the
    rollout's per-step graphs instead measured no faster on a CPU: their backward is slower). A
    :class:`RecurrentActor` carries its state through the rollout from ``memory`` (default: an
    episode's first frame). ``doubt_penalty`` > 0: each step's reward loses that much per unit of
    the model's doubt about it (``world_model.uncertainty``), so a policy gains nothing by going
    where the model is unsure (MOPO's penalised reward).
    """
    penalise = doubt_penalty > 0 and hasattr(world_model, "uncertainty")
    tokens = torch.as_tensor(world_model.reset(context_tokens, context_actions)).long()
    recurrent = isinstance(actor, RecurrentActor)
    if recurrent:
        if memory is None:
            memory = ActorMemory(actor.initial_state(tokens.shape[0], tokens.device),
                                 torch.full((tokens.shape[0],), -1, dtype=torch.long, device=tokens.device))
        state, previous = memory.state, memory.previous_actions
    all_tokens, all_actions, all_rewards, all_continues, all_doubt = [tokens], [], [], [], []
    for _ in range(horizon):
        if recurrent:
            logits, state = actor.step(tokens, previous, state)
        else:
            logits = actor(tokens)
        actions = sample_actions(logits, generator)
        doubt = torch.as_tensor(world_model.uncertainty(actions)).float() if penalise else None
        step = world_model.step(actions)
        tokens = torch.as_tensor(step.tokens).long()
        previous = actions
        all_tokens.append(tokens)
        all_actions.append(actions)
        reward = torch.as_tensor(step.reward).float()
        if doubt is not None:
            all_doubt.append(doubt)
            reward = reward - doubt_penalty * doubt
        all_rewards.append(reward)
        all_continues.append(1.0 - torch.as_tensor(step.terminated).float())
    return Trajectory(
        tokens=torch.stack(all_tokens), actions=torch.stack(all_actions),
        rewards=torch.stack(all_rewards), continues=torch.stack(all_continues),
        doubt=torch.stack(all_doubt) if all_doubt else None,
        memory=memory,
    )


# ---------------------------------------------------------------------------------------------
# The agent: actor, critic, slow critic, optional prior; one loss
# ---------------------------------------------------------------------------------------------


@dataclass
class Losses:
    """A total to minimise plus named parts (the parts become log keys)."""

    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


class DreamerAgent(nn.Module):
    """Actor, critic, slow critic, return normaliser and (optionally) a frozen behaviour prior.

    ``vocab_size`` and ``grid_shape`` (h, w) describe the token input: the tokenizer's vocabulary
    and its token grid (one token per env tile).
    """

    def __init__(self, cfg: DreamerConfig, vocab_size: int, grid_shape: tuple[int, int], num_actions: int = NUM_ACTIONS):
        super().__init__()
        if cfg.actor_update not in ACTOR_UPDATES:
            raise ValueError(f"dreamer.actor_update must be one of {ACTOR_UPDATES}, got '{cfg.actor_update}'")
        if cfg.actor_memory not in ("none", "gru"):
            raise ValueError(f"dreamer.actor_memory must be none or gru here (auto is resolved by resolve_actor_memory), "
                             f"got '{cfg.actor_memory}'")
        if cfg.actor_memory != "none" and (cfg.bc_steps > 0 or cfg.bc_prior):
            raise ValueError("dreamer.bc_steps and dreamer.bc_prior clone single frames: they need dreamer.actor_memory=none")
        self.cfg = cfg
        self.vocab_size = int(vocab_size)
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self.actor = build_actor(cfg, vocab_size, self.grid_shape, num_actions)
        self.critic = build_critic(cfg, vocab_size, self.grid_shape)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.prior: Actor | None = None
        self.return_norm = ReturnNormalizer(cfg.return_norm_decay, cfg.return_norm_low, cfg.return_norm_high, cfg.return_norm_floor)

    def freeze_prior(self) -> None:
        """Keep a frozen copy of the current actor (after behaviour cloning) as the KL prior."""
        self.prior = copy.deepcopy(self.actor).requires_grad_(False)

    def bc_loss(self, tokens: torch.Tensor, actions: torch.Tensor) -> Losses:
        """Behaviour cloning: cross-entropy of dataset actions (N,) given their frames' tokens (N, h, w)."""
        logits = self.actor(tokens)
        loss = F.cross_entropy(logits, actions)
        accuracy = (logits.argmax(-1) == actions).float().mean()
        return Losses(loss, {"bc_loss": float(loss.detach()), "bc_accuracy": float(accuracy)})

    def entropy_coef(self, progress: float) -> float:
        """The entropy weight at ``progress`` in [0, 1] of training: linear from start to final.

        A fixed bonus keeps pushing once advantages vanish near the optimum (entropy climbs back
        and the return falls); decaying it lets the policy commit when it has found the answer.
        """
        progress = min(max(progress, 0.0), 1.0)
        return (1 - progress) * self.cfg.entropy_coef + progress * self.cfg.entropy_coef_final

    def compute_loss(self, trajectory: Trajectory, progress: float = 0.0) -> Losses:
        """Actor and critic losses on one imagined batch (also updates the return normaliser).

        ``progress`` in [0, 1]: how far training is (sets the entropy weight)."""
        cfg = self.cfg
        steps, batch = trajectory.actions.shape
        flat_tokens = trajectory.tokens.flatten(0, 1)  # ((T + 1) B, h, w)
        with torch.no_grad():
            slow_values = self.slow_critic(flat_tokens).view(steps + 1, batch)
        returns = lambda_returns(trajectory.rewards, trajectory.continues, slow_values, cfg.discount, cfg.lambda_)
        weights = alive_weights(trajectory.continues)  # (T, B)

        # --- critic: regress to the λ-returns, pulled towards the slow critic
        values = self.critic(trajectory.tokens[:-1].flatten(0, 1)).view(steps, batch)
        critic_loss = weighted_mean(0.5 * (values - returns) ** 2, weights)
        slow_reg = weighted_mean(0.5 * (values - slow_values[:-1]) ** 2, weights)

        # --- actor
        self.return_norm.update(returns, weights)
        scale = self.return_norm.scale()
        advantages = ((returns - values) / scale).detach()
        logits = self.actor_logits(trajectory)
        log_probs = F.log_softmax(logits, dim=-1).gather(-1, trajectory.actions.unsqueeze(-1)).squeeze(-1)
        policy_entropy = entropy(logits)
        if cfg.actor_update == "pmpo":
            policy_loss = pmpo_loss(log_probs, advantages, weights, cfg.pmpo_alpha)
        else:
            policy_loss = reinforce_loss(log_probs, advantages, weights)
        entropy_coef = self.entropy_coef(progress)
        actor_loss = policy_loss - entropy_coef * weighted_mean(policy_entropy, weights)
        kl = torch.zeros(())
        if self.prior is not None or cfg.actor_update == "pmpo":
            if self.prior is not None:
                with torch.no_grad():
                    prior_logits = self.prior(trajectory.tokens[:-1].flatten(0, 1)).view(steps, batch, -1)
            else:  # PMPO without a behaviour prior: KL to the uniform policy
                prior_logits = torch.zeros_like(logits)
            kl = weighted_mean(kl_divergence(logits, prior_logits), weights)
            actor_loss = actor_loss + cfg.prior_kl_coef * kl

        total = actor_loss + critic_loss + cfg.slow_critic_reg * slow_reg
        # Imagined return of the rollout from its start (undiscounted sum of live rewards).
        imagined_return = (trajectory.rewards * weights).sum(0).mean()
        parts = {
            "actor_loss": float(actor_loss.detach()), "policy_loss": float(policy_loss.detach()), "critic_loss": float(critic_loss.detach()),
            "slow_critic_reg": float(slow_reg.detach()), "entropy": float(weighted_mean(policy_entropy.detach(), weights)),
            "prior_kl": float(kl.detach()), "return_scale": float(scale), "lambda_return": float(weighted_mean(returns, weights)),
            "value": float(weighted_mean(values.detach(), weights)), "imagined_return": float(imagined_return),
            "terminated_fraction": float(1 - trajectory.continues.prod(0).mean()), "entropy_coef": entropy_coef,
        }
        return Losses(total, parts)

    def actor_logits(self, trajectory: Trajectory) -> torch.Tensor:
        """(T, B, A) the actor's logits on the imagined frames, with their graph (a recurrent actor
        from the trajectory's start memory, over the whole stretch at once)."""
        steps, batch = trajectory.actions.shape
        if isinstance(self.actor, RecurrentActor):
            memory = trajectory.memory
            if memory is None:
                memory = ActorMemory(self.actor.initial_state(batch, trajectory.tokens.device),
                                     torch.full((batch,), -1, dtype=torch.long, device=trajectory.tokens.device))
            previous = torch.cat([memory.previous_actions[None], trajectory.actions[:-1]])
            return self.actor.sequence(trajectory.tokens[:-1], previous, memory.state)[0]
        return self.actor(trajectory.tokens[:-1].flatten(0, 1)).view(steps, batch, -1)

    @torch.no_grad()
    def update_slow_critic(self) -> None:
        """slow <- decay * slow + (1 - decay) * critic."""
        for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters()):
            slow.mul_(self.cfg.slow_critic_decay).add_((1 - self.cfg.slow_critic_decay) * fast)


# ---------------------------------------------------------------------------------------------
# The saved policy
# ---------------------------------------------------------------------------------------------


@register_policy("dreamer")
class DreamerPolicy(TokenActorPolicy):
    """The trained actor as a :class:`~agents.policy.Policy`: acts on ``tokens`` (B, h, w).

    ``mode``: ``sample`` draws from the actor's distribution (with the policy's own generator, so
    ``reset(seed=...)`` makes episodes reproducible), ``greedy`` takes the most likely action.
    ``tokenizer_identity`` names the tokenizer whose tokens the actor was trained on; the
    evaluator refuses to feed it tokens from another one.
    """

    def __init__(
        self, actor: AnyActor, config: DreamerConfig, grid_shape: tuple[int, int], mode: str = "sample",
        tokenizer_identity: str = "", env_id: str = "", name: str = "dreamer", training_step: int = 0,
        device: str = "cpu",
    ):
        super().__init__(name)
        if mode not in ("sample", "greedy"):
            raise ValueError(f"dreamer policy mode must be sample or greedy, got '{mode}'")
        self.actor = actor.to(device).eval()
        self.config = config
        self.grid_shape = tuple(grid_shape)
        self.mode = mode
        self.tokenizer_identity = tokenizer_identity
        self.env_id = env_id
        self.training_step = int(training_step)
        self.device = device
        self.memory: torch.Tensor | None = None  # (B, m): a recurrent actor's state in the episodes under way
        self.previous_actions: torch.Tensor | None = None  # (B,): what it did last (-1 before the first step)

    def reset(self, batch_size: int, seed: int | None = None) -> None:
        super().reset(batch_size, seed)
        self.memory, self.previous_actions = None, None  # new episodes remember nothing

    def logits(self, tokens: Any) -> np.ndarray:
        """(B, h, w) tokens -> (B, A) logits; a recurrent actor reads them into its memory (one
        call per step of the episodes, then :meth:`act` records the action taken)."""
        if not isinstance(self.actor, RecurrentActor):
            return super().logits(tokens)
        with torch.no_grad():
            tensor = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=self.device)
            if tuple(tensor.shape[1:]) != self.grid_shape:
                raise ValueError(f"policy '{self.name}' was trained on token grids {self.grid_shape}, "
                                 f"got {tuple(tensor.shape[1:])}")
            batch = tensor.shape[0]
            if self.memory is None or self.memory.shape[0] != batch:
                self.memory = self.actor.initial_state(batch, self.device)
                self.previous_actions = torch.full((batch,), -1, dtype=torch.long, device=self.device)
            logits, self.memory = self.actor.step(tensor, self.previous_actions, self.memory)
            return logits.double().cpu().numpy()

    def act(self, inp: PolicyInput) -> np.ndarray:
        actions = super().act(inp)
        if isinstance(self.actor, RecurrentActor):
            self.previous_actions = torch.as_tensor(actions, dtype=torch.long, device=self.device)
        return actions

    def checkpoint(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "vocab_size": self.actor.encoder.vocab_size,
            "grid_shape": list(self.grid_shape),
            "num_actions": self.actor.num_actions,
            "actor": {k: v.cpu() for k, v in self.actor.state_dict().items()},
            "mode": self.mode,
            "tokenizer_identity": self.tokenizer_identity,
            "env_id": self.env_id,
            "training_step": self.training_step,
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], device: str = "cpu") -> "DreamerPolicy":
        for key in ("config", "vocab_size", "grid_shape", "actor"):
            if key not in checkpoint:
                raise ValueError(f"dreamer checkpoint lacks '{key}': not written by agents.train_dreamer?")
        known = {f for f in DreamerConfig.__dataclass_fields__}
        config = DreamerConfig(**{k: v for k, v in checkpoint["config"].items() if k in known})
        grid_shape = tuple(checkpoint["grid_shape"])
        actor = build_actor(config, int(checkpoint["vocab_size"]), grid_shape,  # type: ignore[arg-type]
                            int(checkpoint.get("num_actions", NUM_ACTIONS)))
        actor.load_state_dict(checkpoint["actor"])
        return cls(
            actor, config, grid_shape, mode=checkpoint.get("mode", config.act_mode),  # type: ignore[arg-type]
            tokenizer_identity=checkpoint.get("tokenizer_identity", ""), env_id=checkpoint.get("env_id", ""),
            name=checkpoint.get("name", "dreamer"), training_step=checkpoint.get("training_step", 0), device=device,
        )
