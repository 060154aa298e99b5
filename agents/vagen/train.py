"""Training loop of the VAGEN-style agent: PPO on token log-probs, rewarded for being right.

Each turn the agent reads the frame and its last actions, writes a response (state estimate,
prediction, action: :mod:`agents.vagen.vocab`) and the env executes the action. One update:

1. collect a rollout: ``rollout_turns`` turns in ``num_envs`` envs (real or dreamt), scoring each
   response's estimate against the true state before the step and its prediction against the
   true state after it;
2. compute advantages: the task reward through bi-level (or turn-level) GAE; the world-modeling
   reward (or the format penalty) through a second value stream, each turn and field on its own
   (:mod:`agents.vagen.credit`); each stream whitened apart, then added;
3. update: clipped PPO on token log-probs, minibatches over turns, stopped early when the
   policy has moved too far from the rollout's;
4. log, and now and then write a resume checkpoint.

After the last update the agent is evaluated in the real env and saved as ``vagen.pt``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from agents.evaluate import normalized_score, reference_returns, run_real
from agents.policy import save_policy
from agents.rl import masked_whiten, ppo_loss
from agents.vagen.credit import ValueNormalizer, task_advantages, world_model_advantages
from agents.vagen.net import VagenModelConfig, VagenNet, generate, token_logprobs
from agents.vagen.policy import VagenAgent
from agents.vagen.pools import make_pool
from agents.vagen.vocab import (
    FIELDS,
    STRATEGIES,
    Vocab,
    chance_state_accuracy,
    full_world_model_reward,
    parse_response,
    random_well_formed,
    readout_positions,
    slot_mask,
    state_fields,
    template,
    world_model_reward,
)
from common.atomic import atomic_torch_save
from common.config import ConfigError, check_values, param
from common.runs import Logger, RunDir
from common.seeding import derive_seed, seed_everything
from common.stage import check_finite, load_resume
from envs.make import make_env_from_config
from envs.state import StateCodec


@dataclass
class VagenConfig:
    """VAGEN-style agent: state estimation and transition modelling, PPO with bi-level GAE."""

    # --- strategy and rewards ---
    strategy: str = param("WorldModeling", f"what the agent writes before acting: one of {', '.join(STRATEGIES)}", choices=STRATEGIES)
    free_think_len: int = param(12, "FreeThink: free tokens before the action (12 = WorldModeling's thinking length)", min=0)
    state_weight: float = param(0.5, "world-modeling reward of a fully correct state estimate, per turn", min=0)
    prediction_weight: float = param(0.5, "world-modeling reward of a fully correct next-state prediction, per turn", min=0)
    field_weights: dict[str, float] = param(
        default_factory=lambda: {f: 1.0 for f in FIELDS}, help=f"relative weight of each field in the accuracy: {', '.join(FIELDS)}", min=0
    )
    format_penalty: float = param(-0.1, "reward of a malformed response (instead of the world-modeling reward)")
    world: str = param("real", "where it trains: real (the MiniGrid env) or dream (the world model; truth = its state head)", choices=("real", "dream"))
    world_model: str = param("", "dream only: run folder holding tokenizer.pt and dynamics.pt (default: this run)")
    # --- credit assignment ---
    advantage: str = param("bilevel", "task credit: bilevel (turn-level then token-level GAE) or turn (turn-level only)", choices=("bilevel", "turn"))
    turn_gamma: float = param(0.99, "turn-level discount of the task reward", min=0, max=1)
    turn_lambda: float = param(0.95, "turn-level GAE lambda of the task reward", min=0, max=1)
    token_gamma: float = param(1.0, "token-level discount inside a turn (bilevel only)", min=0, max=1)
    token_lambda: float = param(1.0, "token-level GAE lambda inside a turn (bilevel only)", min=0, max=1)
    advantage_std_floor: float = param(0.05, "whitening divides each stream's advantages by max(std, this)", min=0)
    # --- network ---
    d_model: int = param(32, "transformer width", min=1)
    layers: int = param(2, "transformer decoder blocks", min=1)
    heads: int = param(4, "attention heads", min=1)
    history_len: int = param(2, "previous actions the agent sees (its turn history)", min=0)
    frame_hidden: int = param(128, "summary width of the action's and the critic's frame encoders (the PPO baseline's)", min=1)
    # --- optimisation ---
    lr: float = param(1e-3, "Adam learning rate at the first update (linear decay to lr_final)", above=0)
    lr_final: float = param(1e-4, "learning rate at the last update (the PPO baseline's schedule)", min=0)
    readout_lr_scale: float = param(3.0, "the cell read-out's learning rate, as a multiple of lr", min=0)
    epochs: int = param(8, "PPO epochs over each rollout", min=1)
    minibatch_turns: int = param(128, "turns per PPO minibatch", min=1)
    clip: float = param(0.2, "PPO ratio clip", above=0)
    target_kl: float = param(0.0, "stop an update once a minibatch's mean per-token KL exceeds 1.5x this (0: off)", min=0)
    value_coef: float = param(0.5, "weight of the value loss", min=0)
    value_std_floor: float = param(0.1, "floor under the critic's return normaliser's std, in reward units", above=0)
    value_huber_delta: float = param(1.0, "Huber loss on the critic's normalised values, linear beyond this error (0: squared error)", min=0)
    entropy_coef: float = param(0.01, "weight of the entropy bonus (over the tokens each slot accepts)", min=0)
    max_grad_norm: float = param(0.5, "gradient norm clip, actor and critic apart", above=0)
    format_warmup_steps: int = param(200, "next-token steps on random well-formed responses before RL (0: off)", min=0)
    temperature: float = param(1.0, "sampling temperature while collecting rollouts", min=0)
    # --- budget, evaluation, logging ---
    total_env_steps: int = param(100_352, "env steps (turns) to train for, over all envs", min=1)
    num_envs: int = param(8, "envs stepped together (one batched decode per turn)", min=1)
    rollout_turns: int = param(64, "turns per env between updates", min=1)
    eval_episodes: int = param(32, "real-env episodes of the final evaluation", min=1)
    eval_seed: int = param(1_000_000, "env seed base of evaluation episodes (apart from training seeds)", min=0)
    eval_temperature: float = param(1.0, "sampling temperature in evaluation (0: greedy)", min=0)
    eval_every: int = param(0, "updates between real-env evaluations during training, for the learning curve (0: the final one only)", min=0)
    log_every: int = param(1, "updates between scalar logs", min=1)
    checkpoint_every: int = param(10, "updates between resume checkpoints (0: never)", min=0)


def check_config(vcfg: Any) -> None:
    """The vagen section's values: each field's bounds and choices (declared on ``VagenConfig``), then
    what those cannot express; each error names its key. ``scripts.config.validate`` runs it for every
    script; ``train`` again, for callers that build their config another way."""
    check_values(VagenConfig, vcfg, prefix="vagen.")
    if vcfg.lr_final > vcfg.lr:
        raise ValueError(f"vagen.lr_final: must not exceed vagen.lr ({vcfg.lr}), got {vcfg.lr_final}")
    if vcfg.d_model % vcfg.heads:
        raise ValueError(f"vagen.d_model: must be a multiple of vagen.heads ({vcfg.heads}), got {vcfg.d_model}")
    unknown = set(vcfg.field_weights) - set(FIELDS)
    if unknown:
        raise ValueError(f"vagen.field_weights: unknown fields {sorted(unknown)}; fields are {FIELDS}")


def agent_codec(cfg: Any) -> tuple[StateCodec, Vocab]:
    """The state codec and response vocabulary of ``cfg.env``: its grid, and its action count."""
    env = make_env_from_config(cfg.env)
    base = env.unwrapped
    codec, vocab = StateCodec(base.width, base.height), Vocab(base.width, base.height, int(env.action_space.n))
    env.close()
    return codec, vocab


# ---------------------------------------------------------------------------------------------
# One update's data
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """T turns of N envs, (N, T, ...) so that each env's turns are in time order. frames (N, T, H, W, 3)
    uint8, history (N, T, K); tokens, mask, logprobs (N, T, L) of the sampled responses; values
    (N, T, L, S) in return units, per value stream; task_rewards (the turn reward: task, plus the
    format penalty when there is one stream), dones, well_formed (N, T); wm_rewards (N, T) and
    slot_rewards (N, T, L) the world-modeling stream's; last_value (N,) the task value after the
    last turn; stats: per-turn figures for the log."""

    frames: torch.Tensor
    history: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    task_rewards: torch.Tensor
    dones: torch.Tensor
    well_formed: torch.Tensor
    wm_rewards: torch.Tensor
    slot_rewards: torch.Tensor
    last_value: torch.Tensor
    stats: dict[str, list[float]]


class Collector:
    """Plays turns in the env pool and keeps what runs on across updates: the current frames and
    states, the turn history, and the episodes in progress."""

    def __init__(self, pool: Any, vcfg: Any, vocab: Vocab, codec: StateCodec, split: bool):
        self.pool, self.vcfg, self.vocab, self.codec, self.split = pool, vcfg, vocab, codec, split
        self.length = len(template(vcfg.strategy, vcfg.free_think_len))
        self.recent: deque = deque(maxlen=2 * vcfg.num_envs)  # (return, length, success) of the last finished episodes
        self.restart(pool.seed)

    def restart(self, seed: int) -> None:
        """Fresh episodes in every env (from ``seed``), with an empty history."""
        N = self.vcfg.num_envs
        self.pool.seed = seed
        self.frames, self.states = self.pool.reset()
        self.history = np.full((N, self.vcfg.history_len), self.vocab.num_actions, dtype=np.int64)
        self.ep_return, self.ep_len = np.zeros(N), np.zeros(N, int)

    def collect(self, net: VagenNet, value_norms: list[ValueNormalizer], generator: torch.Generator) -> Rollout:
        vcfg, vocab, N, T, L = self.vcfg, self.vocab, self.vcfg.num_envs, self.vcfg.rollout_turns, self.length
        frames_buf = np.zeros((T, *self.frames.shape), np.uint8)
        history_buf = np.zeros((T, N, vcfg.history_len), np.int64)
        tokens, mask = torch.zeros(T, N, L, dtype=torch.long), torch.zeros(T, N, L, dtype=torch.bool)
        logprobs, values = torch.zeros(T, N, L), torch.zeros(T, N, L, len(value_norms))
        task_rewards, dones = torch.zeros(T, N), torch.zeros(T, N, dtype=torch.bool)
        wm_rewards, slot_rewards = torch.zeros(T, N), torch.zeros(T, N, L)
        well_formed = torch.ones(T, N, dtype=torch.bool)
        stats: dict[str, list[float]] = {k: [] for k in ("state_acc", "pred_acc", "format", "wm_reward")}
        field_weights = dict(vcfg.field_weights)
        net.eval()
        for t in range(T):
            frames_buf[t], history_buf[t] = self.frames, self.history
            gen = generate(net, torch.from_numpy(self.frames), torch.from_numpy(self.history), L, vocab.first_action, generator, vcfg.temperature)
            lengths = gen.mask.sum(-1).tolist()
            parsed = [parse_response(gen.tokens[i, : lengths[i]].tolist(), vcfg.strategy, vocab, vcfg.free_think_len) for i in range(N)]
            actions = np.array([p.action for p in parsed], dtype=np.int64)
            step = self.pool.step(actions)
            # Score each response against the truth before and after its step.
            for i in range(N):
                truth, next_truth = state_fields(self.states[i], self.codec, vocab), state_fields(step.next_states[i], self.codec, vocab)
                wm = world_model_reward(
                    parsed[i], vcfg.strategy, truth, next_truth, state_weight=vcfg.state_weight,
                    prediction_weight=vcfg.prediction_weight, field_weights=field_weights, format_penalty=vcfg.format_penalty,
                )
                for part, said, true in (("state", parsed[i].state, truth), ("prediction", parsed[i].prediction, next_truth)):
                    if said is not None:  # per-field accuracy of well-formed responses (which fields lag)
                        for f in FIELDS:
                            stats.setdefault(f"{part}_{f}", []).append(float(said[f] == true[f]))
                if self.split:  # the task reward; the world-modeling reward (or the format penalty) apart
                    task_rewards[t, i] = float(step.rewards[i])
                    wm_rewards[t, i] = wm.reward
                    well_formed[t, i] = parsed[i].well_formed
                    if wm.slot_rewards is not None:
                        slot_rewards[t, i] = torch.tensor(wm.slot_rewards)
                else:  # no world-modeling reward: the format penalty joins the task reward
                    task_rewards[t, i] = float(step.rewards[i]) + wm.reward
                stats["state_acc"].append(wm.state_accuracy)
                stats["pred_acc"].append(wm.prediction_accuracy)
                stats["format"].append(float(parsed[i].well_formed))
                stats["wm_reward"].append(wm.reward)
            tokens[t], mask[t], logprobs[t] = gen.tokens, gen.mask, gen.logprobs
            values[t] = _denormalize(value_norms, gen.values)
            dones[t] = torch.from_numpy(step.dones)
            # The turn history: shift in the executed action; a new episode starts with none.
            self.ep_return += step.rewards
            self.ep_len += 1
            if vcfg.history_len:
                self.history = np.concatenate([self.history[:, 1:], actions[:, None]], axis=1)
            for i in np.nonzero(step.dones)[0]:
                self.recent.append((self.ep_return[i], self.ep_len[i], float(step.terminated[i] and step.rewards[i] > 0)))
                self.ep_return[i], self.ep_len[i] = 0.0, 0
                self.history[i] = vocab.num_actions
            self.frames, self.states = step.frames, step.states
        # Bootstrap: the task value at the last token of a response to the next observation.
        boot = generate(net, torch.from_numpy(self.frames), torch.from_numpy(self.history), L, vocab.first_action, generator, vcfg.temperature)
        boot_values = _denormalize(value_norms, boot.values)[..., 0]
        last_value = boot_values.gather(-1, (boot.mask.sum(-1, keepdim=True) - 1)).squeeze(-1)
        to_nt = lambda x: x.transpose(0, 1)  # noqa: E731  (T, N, ...) -> (N, T, ...)
        return Rollout(
            torch.from_numpy(frames_buf.swapaxes(0, 1)), torch.from_numpy(history_buf.swapaxes(0, 1)), to_nt(tokens), to_nt(mask),
            to_nt(logprobs), to_nt(values), to_nt(task_rewards), to_nt(dones), to_nt(well_formed), to_nt(wm_rewards),
            to_nt(slot_rewards), last_value, stats,
        )


def _denormalize(norms: list[ValueNormalizer], values: torch.Tensor) -> torch.Tensor:
    """The critic's outputs (B, L) or (B, L, S) in return units, (B, L, S): one stream included."""
    values = values.reshape(*values.shape[:2], len(norms))
    return torch.stack([norm.denormalize(values[..., k]) for k, norm in enumerate(norms)], -1)


@dataclass
class Batch:
    """A rollout flattened to turns (M = N * T) for PPO: frames (M, H, W, 3), history (M, K);
    tokens, mask, logprobs, advantages (M, L); returns and value_mask (M, L, S), normalised per stream."""

    frames: torch.Tensor
    history: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    value_mask: torch.Tensor


def compute_advantages(rollout: Rollout, value_norms: list[ValueNormalizer], vcfg: Any, first_action: int) -> Batch:
    """Advantages of both streams (each whitened apart, then added: the dense world-modeling
    advantages would otherwise set the scale and shrink the sparse task reward's signal), and
    the value targets, normalised after the normalisers have seen them."""
    r = rollout
    whiten = lambda adv, mask: masked_whiten(adv, mask, std_floor=vcfg.advantage_std_floor)  # noqa: E731
    advantages, returns = task_advantages(
        r.task_rewards, r.dones, r.values[..., 0], r.mask, r.last_value, advantage=vcfg.advantage,
        turn_gamma=vcfg.turn_gamma, turn_lambda=vcfg.turn_lambda, token_gamma=vcfg.token_gamma, token_lambda=vcfg.token_lambda,
    )
    stream_returns, stream_masks = [returns], [r.mask]
    advantages = whiten(advantages, r.mask)
    if len(value_norms) == 2:
        wm_adv, wm_ret, credited = world_model_advantages(
            r.wm_rewards, r.slot_rewards, r.values[..., 1], r.mask, r.tokens, r.well_formed, first_action
        )
        advantages = advantages + whiten(wm_adv, credited)
        stream_returns.append(wm_ret)
        stream_masks.append(credited)
    returns, value_mask = torch.stack(stream_returns, -1), torch.stack(stream_masks, -1)  # (N, T, L, streams)
    for k, norm in enumerate(value_norms):
        norm.update(returns[..., k][value_mask[..., k]])
    returns = torch.stack([norm.normalize(returns[..., k]) for k, norm in enumerate(value_norms)], -1)
    flat = lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])  # noqa: E731  (N, T, ...) -> (N * T, ...)
    return Batch(
        flat(r.frames), flat(r.history), flat(r.tokens), flat(r.mask), flat(r.logprobs), flat(advantages), flat(returns), flat(value_mask)
    )


CRITIC = ("value_head.", "value_encoder.")  # the critic's own parameters (its gradient is clipped apart)
DIRECT = ("frame_encoder.", "action_head.", "value_encoder.", "value_head.")  # the direct frame paths: no format warm-up


def ppo_update(net: VagenNet, optimizer: torch.optim.Optimizer, batch: Batch, vcfg: Any, entropy_mask: torch.Tensor,
               order_gen: torch.Generator, update: int) -> dict[str, list[float]]:
    """``epochs`` passes of clipped PPO over the batch in minibatches of ``minibatch_turns`` turns;
    returns each loss part per minibatch, and whether the KL stop ended the update."""
    net.train()
    actor_params = [p for name, p in net.named_parameters() if not name.startswith(CRITIC)]
    critic_params = [p for name, p in net.named_parameters() if name.startswith(CRITIC)]
    parts: dict[str, list[float]] = {}
    count = len(batch.tokens)
    stopped = False
    for _ in range(vcfg.epochs):
        if stopped:
            break
        order = torch.randperm(count, generator=order_gen)
        for lo in range(0, count, vcfg.minibatch_turns):
            idx = order[lo : lo + vcfg.minibatch_turns]
            logprobs, entropy, values = token_logprobs(net, batch.frames[idx], batch.history[idx], batch.tokens[idx], entropy_mask)
            values = values.reshape(*logprobs.shape, -1)  # (M, L, streams), one stream included
            losses = ppo_loss(
                logprobs, batch.logprobs[idx], batch.advantages[idx], values, batch.returns[idx], entropy, batch.mask[idx],
                clip=vcfg.clip, value_coef=vcfg.value_coef, entropy_coef=vcfg.entropy_coef, value_mask=batch.value_mask[idx],
                huber_delta=vcfg.value_huber_delta,
            )
            if vcfg.target_kl > 0 and losses.parts["approx_kl"] > 1.5 * vcfg.target_kl:
                stopped = True  # the policy already moved far enough from the rollout's: no more steps on it
                break
            check_finite(losses.total, "vagen", update + 1, "lower vagen.lr")
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            # Clipped apart: the critic's gradient must not shrink the policy's.
            torch.nn.utils.clip_grad_norm_(actor_params, vcfg.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(critic_params, vcfg.max_grad_norm)
            optimizer.step()
            for k, v in losses.parts.items():
                parts.setdefault(k, []).append(v)
    parts["early_stop"] = [float(stopped)]
    return parts


def format_warmup(net: VagenNet, vcfg: Any, vocab: Vocab, frames: np.ndarray, generator: torch.Generator) -> None:
    """Next-token steps on responses with a uniformly random token in every slot.

    A pretrained language model brings the response format to VAGEN; a network trained from
    scratch brings nothing, and with ~10^-8 odds of sampling a well-formed 15-token response every
    turn earns the same format penalty and PPO gets no signal. Random content teaches the grammar
    and nothing about the world (every field value, every action equally likely). The frame
    encoders sit it out: fitting random responses would teach them that the frame does not matter."""
    direct = [p for name, p in net.named_parameters() if name.startswith(DIRECT)]
    optimizer = torch.optim.Adam([p for name, p in net.named_parameters() if not name.startswith(DIRECT)], lr=3e-3, foreach=True)
    frames_t = torch.from_numpy(frames)
    net.train()
    for p in direct:  # no gradient computed for what is not trained here
        p.requires_grad_(False)
    for _ in range(vcfg.format_warmup_steps):
        batch = 64
        rows = torch.randint(len(frames_t), (batch,), generator=generator)
        tokens = random_well_formed(vcfg.strategy, vocab, batch, generator, vcfg.free_think_len)
        history = torch.randint(vocab.num_actions + 1, (batch, vcfg.history_len), generator=generator)
        logprobs, _, _ = token_logprobs(net, frames_t[rows], history, tokens)
        loss = -logprobs.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for p in direct:
        p.requires_grad_(True)
    print(f"[vagen] format warm-up: {vcfg.format_warmup_steps} steps, final next-token loss {loss.item():.3f}")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def check_view(cfg: Any) -> None:
    """The agent reads the whole grid (its frame encoder and its state fields are the full view's)."""
    if str(cfg.env.obs) != "full":
        raise ConfigError(f"env.obs: the VAGEN agent reads the full view (its frame encoder and state fields are "
                          f"the whole grid's); got env.obs={cfg.env.obs}: train it with env.obs=full")


def train(cfg: Any, run: RunDir) -> dict[str, Any]:
    """Train the agent of ``cfg.vagen`` in run folder ``run``; write ``vagen.pt`` and return the
    final evaluation (also merged into ``metrics.json`` under ``vagen``)."""
    vcfg = cfg.vagen
    check_config(vcfg)
    check_view(cfg)
    final_path, resume_path = run / "vagen.pt", run / "vagen.resume.pt"

    # --- set-up -----------------------------------------------------------------------------------
    seed_everything(cfg.run.seed)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    generator = torch.Generator().manual_seed(derive_seed(cfg.run.seed, 1))
    codec, vocab = agent_codec(cfg)
    pool = make_pool(cfg, run, seed=derive_seed(cfg.run.seed, 2))
    # Two value streams where there is a world-modeling reward: the action answers to the task alone.
    split = full_world_model_reward(vcfg.strategy, vcfg.state_weight, vcfg.prediction_weight) > 0
    collector = Collector(pool, vcfg, vocab, codec, split)
    length = collector.length
    net = VagenNet(VagenModelConfig(
        vocab_size=len(vocab), grid_width=codec.width, grid_height=codec.height, tile_size=cfg.env.tile_size,
        max_response_len=length, num_actions=vocab.num_actions, first_cell_token=vocab.cell(0, 0),
        readout_tokens=vocab.attribute_tokens, readout_positions=readout_positions(vcfg.strategy, vocab, vcfg.free_think_len),
        history_len=vcfg.history_len, frame_hidden=vcfg.frame_hidden, d_model=vcfg.d_model, layers=vcfg.layers, heads=vcfg.heads, value_streams=2 if split else 1,
    ))
    value_norms = [ValueNormalizer(std_floor=vcfg.value_std_floor) for _ in range(2 if split else 1)]  # task; world-modeling
    readout = [p for name, p in net.named_parameters() if name.startswith("cell_readout.")]
    others = [p for name, p in net.named_parameters() if not name.startswith("cell_readout.")]
    optimizer = torch.optim.Adam(
        [{"params": others, "lr": vcfg.lr}, {"params": readout, "lr": vcfg.lr * vcfg.readout_lr_scale}], lr=vcfg.lr, eps=1e-5,
        foreach=True,  # one fused step over the parameter tensors: the single-tensor default cost a tenth of a run
    )
    entropy_mask = slot_mask(vcfg.strategy, vocab, vcfg.free_think_len)
    steps_per_update = vcfg.num_envs * vcfg.rollout_turns
    num_updates = max(1, math.ceil(vcfg.total_env_steps / steps_per_update))
    logger = Logger(run, cfg, "vagen")
    truth_source = "the world model's state head" if vcfg.world == "dream" else "the real env's symbolic state"
    return_name = "imagined_return" if vcfg.world == "dream" else "real_return"  # the final evaluation is always real
    print(
        f"[vagen] {vcfg.strategy} ({vcfg.advantage} GAE) in the {vcfg.world} env {cfg.env.id}: {num_updates} updates x "
        f"{steps_per_update} turns, response of {length} tokens, {sum(p.numel() for p in net.parameters())} parameters; "
        f"truth for state/prediction rewards: {truth_source}"
    )
    start_update = 0
    saved = load_resume(resume_path, run, "vagen")
    if saved is not None:
        net.load_state_dict(saved["net"])
        for norm, state in zip(value_norms, saved["value_norms"]):
            norm.load_state_dict(state)
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        start_update = int(saved["update"])
        print(f"[vagen] resuming from {resume_path} at update {start_update} (envs restart fresh episodes)")
        collector.restart(derive_seed(cfg.run.seed, 2, start_update))
    elif vcfg.format_warmup_steps > 0:
        format_warmup(net, vcfg, vocab, collector.frames, generator)

    def make_agent() -> VagenAgent:
        return VagenAgent(
            net, vcfg.strategy, vocab, vcfg.free_think_len, vcfg.eval_temperature,
            config=OmegaConf.to_container(cfg, resolve=True), name=f"vagen-{vcfg.strategy}",
        )

    curve: list[list[float]] = list(saved.get("curve", [])) if saved is not None else []  # [env steps, normalized score]
    started = time.time()
    for update in range(start_update, num_updates):
        # --- the algorithm: collect, credit, update ---------------------------------------------------
        progress = update / max(1, num_updates - 1)
        for group, scale in zip(optimizer.param_groups, (1.0, vcfg.readout_lr_scale)):
            group["lr"] = scale * ((1 - progress) * vcfg.lr + progress * vcfg.lr_final)
        rollout = collector.collect(net, value_norms, generator)
        batch = compute_advantages(rollout, value_norms, vcfg, vocab.first_action)
        order_gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, 3, update))
        parts = ppo_update(net, optimizer, batch, vcfg, entropy_mask, order_gen, update)

        # --- log and checkpoint -----------------------------------------------------------------------
        env_steps = (update + 1) * steps_per_update
        if (update + 1) % vcfg.log_every == 0 or update + 1 == num_updates:
            _log(logger, cfg, rollout, collector, parts, return_name, env_steps, update, num_updates,
                 speed=(env_steps - start_update * steps_per_update) / (time.time() - started))
        if vcfg.eval_every > 0 and (update + 1) % vcfg.eval_every == 0 and update + 1 < num_updates:
            score = evaluate(make_agent(), cfg, vcfg.eval_episodes, vcfg.eval_seed)["normalized_score"]  # its own generator
            curve.append([env_steps, score])
            logger.scalars(env_steps, {"curve/normalized_score": score})
        if vcfg.checkpoint_every > 0 and (update + 1) % vcfg.checkpoint_every == 0 and update + 1 < num_updates:
            atomic_torch_save(resume_path, {
                "net": net.state_dict(), "value_norms": [n.state_dict() for n in value_norms], "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "update": update + 1, "stage_identity": run.stage_identity, "curve": curve,
            })

    # --- evaluate and save ---------------------------------------------------------------------------
    agent = make_agent()
    metrics = evaluate(agent, cfg, vcfg.eval_episodes, vcfg.eval_seed)
    metrics.update({
        "strategy": vcfg.strategy, "advantage": vcfg.advantage, "world": vcfg.world, "env_id": cfg.env.id,
        "env_steps": num_updates * steps_per_update, "train_seconds": time.time() - started,
        "chance_state_accuracy": chance_state_accuracy(vocab, dict(vcfg.field_weights)), "truth": truth_source,
        "curve": curve + [[num_updates * steps_per_update, metrics["normalized_score"]]],
    })
    logger.scalars(num_updates * steps_per_update, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)})
    logger.close()
    save_policy(final_path, agent, env_id=cfg.env.id, metrics=metrics)
    if resume_path.is_file():
        resume_path.unlink()
    run.update_metrics("vagen", metrics)
    print(f"[vagen] evaluation over {metrics['episodes']} real episodes: {metrics}")
    return metrics


def _log(logger: Logger, cfg: Any, rollout: Rollout, collector: Collector, parts: dict[str, list[float]], return_name: str,
         env_steps: int, update: int, num_updates: int, speed: float) -> None:
    """One update's scalars (losses, rollout figures, per-field accuracies) and, with ``run.progress``, a line."""
    stats, recent = rollout.stats, collector.recent
    scalars = {f"loss/{k}": float(np.mean(v)) for k, v in parts.items()}
    scalars.update({
        "rollout/format_rate": float(np.mean(stats["format"])),
        "rollout/state_accuracy": _nanmean(stats["state_acc"]),
        "rollout/prediction_accuracy": _nanmean(stats["pred_acc"]),
        "rollout/world_model_reward": float(np.mean(stats["wm_reward"])),
        f"rollout/{return_name}": _nanmean([r[0] for r in recent]),
        "rollout/episode_length": _nanmean([r[1] for r in recent]),
        "rollout/success_rate": _nanmean([r[2] for r in recent]),
        "rollout/turn_reward": float(rollout.task_rewards.mean()),
        "speed/env_steps_per_s": speed,
    })
    scalars.update({f"fields/{k}": float(np.mean(v)) for k, v in stats.items() if k.startswith(("state_", "prediction_")) and k != "state_acc" and v})
    logger.scalars(env_steps, scalars)
    if cfg.run.progress:
        print(
            f"[vagen] update {update + 1}/{num_updates} steps {env_steps}: {return_name} {scalars[f'rollout/{return_name}']:.3f} "
            f"success {scalars['rollout/success_rate']:.2f} format {scalars['rollout/format_rate']:.2f} "
            f"state_acc {scalars['rollout/state_accuracy']:.3f} pred_acc {scalars['rollout/prediction_accuracy']:.3f} "
            f"({speed:.0f} steps/s)" + "".join(f" {k[7:]} {v:.2f}" for k, v in scalars.items() if k.startswith("fields/")),
            flush=True,
        )


# ---------------------------------------------------------------------------------------------
# Evaluation in the real env
# ---------------------------------------------------------------------------------------------


def optimal_return(env: Any, state_array: np.ndarray, codec: StateCodec) -> float:
    """The BFS oracle's return from this state (``return_ratio``'s denominator), NaN if unplannable."""
    from envs.oracle import plan, task_for_env

    actions = plan(codec.decode(state_array), task_for_env(env))  # KeyCorridor: pick up the ball
    if not actions:
        return float("nan")
    return 1.0 - 0.9 * len(actions) / env.unwrapped.max_steps


def evaluate(agent: VagenAgent, cfg: Any, episodes: int, seed: int, batch: int = 16) -> dict[str, float]:
    """Real-env episodes with seeds ``derive_seed(seed, k)``, played by :func:`agents.evaluate.run_real`
    ``batch`` at a time. Reports the mean return; ``normalized_score``, (R - R_random) / (R_oracle -
    R_random) of the mean return as in :mod:`agents.evaluate`, with the random and the BFS-oracle
    policies' mean returns on the same seeds (``random_return``, ``oracle_return``); ``return_ratio``,
    the return over the oracle's optimal return per episode, averaged; the success rate; and per-turn
    state accuracy, prediction accuracy (malformed turns count as 0; NaN when the strategy has no
    such part) and format rate."""
    vcfg = cfg.vagen
    codec, vocab = agent_codec(cfg)
    probe = make_env_from_config(cfg.env)
    seeds = [derive_seed(seed, k) for k in range(episodes)]
    returns, ratios, lengths = [], [], []
    state_acc, pred_acc, formats = [], [], []

    def score_turn(row: int, state: np.ndarray, next_state: np.ndarray) -> None:
        """The response row ``row`` just acted on, against the true state before and after the step."""
        parsed = agent.last_responses[row]
        wm = world_model_reward(
            parsed, vcfg.strategy, state_fields(state, codec, vocab), state_fields(next_state, codec, vocab),
            state_weight=1.0, prediction_weight=1.0, field_weights=dict(vcfg.field_weights), format_penalty=0.0,
        )
        state_acc.append(wm.state_accuracy)
        pred_acc.append(wm.prediction_accuracy)
        formats.append(float(parsed.well_formed))

    for start in range(0, episodes, batch):
        rollouts = run_real(agent, cfg.env, seeds[start : start + batch], None, derive_seed(seed, start, 7), on_step=score_turn)
        best = [optimal_return(probe, s, codec) for s in rollouts.first_states]
        returns += rollouts.returns.tolist()
        lengths += rollouts.lengths.tolist()
        ratios += [r / b if b > 0 else float("nan") for r, b in zip(rollouts.returns, best)]
    probe.close()
    reference = reference_returns(cfg.env, seeds, derive_seed(seed, 0, 8), env_id=str(cfg.env.id))
    mean_return = float(np.mean(returns))
    return {
        "return": mean_return,
        "normalized_score": normalized_score(mean_return, reference["random"], reference["oracle"]),
        "return_ratio": _nanmean(ratios),
        "random_return": reference["random"],
        "oracle_return": reference["oracle"],
        "success_rate": float(np.mean(np.array(returns) > 0)),
        "episode_length": float(np.mean(lengths)),
        "state_accuracy": _nanmean(state_acc),
        "prediction_accuracy": _nanmean(pred_acc),
        "format_rate": float(np.mean(formats)),
        "episodes": episodes,
    }


def _nanmean(values: list[float]) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
