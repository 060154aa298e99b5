"""Training loop of the VAGEN-style agent: PPO on token log-probs, rewarded for being right.

Each turn the agent reads the frame and its last actions, writes a response (state estimate,
prediction, action: see :mod:`agents.vagen`) and the env executes the action. The turn's reward is
the task reward plus the world-modeling reward (accuracy of the estimate against the true state
before the step and of the prediction against the true state after it), or the format penalty for
a malformed response. Advantages are bi-level (turn-level GAE, then token-level GAE inside each
turn) or turn-level only. In the real env (default) the truth is the env's symbolic state; in the
dream env (``vagen.world=dream``) it is the world model's state head: the model's truth, not the
world's.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from agents.evaluate import normalized_score, reference_returns, run_real
from agents.policy import NUM_ACTIONS, save_policy
from agents.rl import masked_whiten, ppo_loss
from agents.vagen import (
    FIELDS,
    STRATEGIES,
    VagenAgent,
    VagenModelConfig,
    VagenNet,
    Vocab,
    bilevel_gae,
    chance_state_accuracy,
    full_world_model_reward,
    generate,
    parse_response,
    random_well_formed,
    readout_positions,
    readout_tokens_at,
    slot_mask,
    state_fields,
    template,
    token_logprobs,
    turn_level_advantages,
    world_model_reward,
)
from common.atomic import atomic_torch_save
from common.config import check_values, param
from common.runs import Logger, RunDir
from common.seeding import derive_seed, seed_everything
from common.stage import check_finite, load_resume
from envs.make import make_env_from_config
from envs.state import StateCodec


@dataclass
class VagenConfig:
    """VAGEN-style agent: state estimation and transition modelling, PPO with bi-level GAE."""

    strategy: str = param("WorldModeling", f"what the agent writes before acting: one of {', '.join(STRATEGIES)}",
                          choices=STRATEGIES)
    advantage: str = param("bilevel", "credit assignment: bilevel (turn-level then token-level GAE) or turn (turn-level only)",
                           choices=("bilevel", "turn"))
    world: str = param("real", "where it trains: real (the MiniGrid env) or dream (the world model; truth = its state head)",
                       choices=("real", "dream"))
    world_model: str = param("", "dream only: run folder holding tokenizer.pt and dynamics.pt (default: this run)")
    train_max_steps: int = param(
        0, "real env only: step limit of training episodes (0: the env's own); evaluation keeps the env's limit. Shorter episodes mean more fresh starts to learn from",
        min=0,
    )
    total_env_steps: int = param(100_352, "env steps (turns) to train for, over all envs", min=1)
    num_envs: int = param(64, "envs stepped together (one batched decode per turn)", min=1)
    rollout_turns: int = param(32, "turns per env between updates", min=1)
    epochs: int = param(4, "PPO epochs over each rollout", min=1)
    minibatch_turns: int = param(256, "turns per PPO minibatch", min=1)
    lr: float = param(1e-3, "Adam learning rate", above=0)
    popart: bool = param(False, "when the value normaliser's statistics move, rescale the critic's last layer so its values stay put")
    lr_schedule: str = param("constant", "learning rate over the updates: constant, or linear (decays to 0 at the last update)",
                             choices=("constant", "linear"))
    advantage_norm: str = param("global", "advantage whitening: global (over all tokens of a rollout) or per_position (each response slot apart)",
                                choices=("global", "per_position"))
    advantage_std_floor: float = param(
        0.05, "whitening divides by max(std, this): a rollout whose advantages barely differ (all right, no task reward) is not blown up to unit scale",
        min=0,
    )
    detach_critic: bool = param(
        False, "value head on the actor's features with the gradient stopped (True: the critic cannot shape the features; NoThink then learned DoorKey-5x5 far slower)"
    )
    action_credit: str = param(
        "task",
        "what the action token is credited with: turn (the whole turn reward, task plus world-modeling, as in VAGEN: the agent learns to stand still) or "
        "task (the task reward only; the world-modeling reward, or the format penalty, credits the tokens before the action, "
        "each turn on its own, through a second value stream, and the action too where the response is malformed) or "
        "task_and_own_turn (as task, and the action is also credited with its own turn's world-modeling reward, not later turns': "
        "it is paid for carrying out the prediction just written, not for steering towards states that are easy to predict)",
        choices=("turn", "task", "task_and_own_turn"),
    )
    world_model_credit: str = param(
        "field",
        "with action_credit task or task_and_own_turn: how the world-modeling reward credits the tokens before the action: "
        "field (each field's token gets its own field's share, right or wrong, without the other 13 fields' noise: the truth "
        "is exact, so no judge stands in the way; the same under bilevel and turn-level GAE) or turn (each gets the turn's "
        "whole reward, as in VAGEN; the default before 2026-11-22: the estimate was learned ~15k steps later)",
        choices=("turn", "field"),
    )
    clip: float = param(0.2, "PPO ratio clip", above=0)
    target_kl: float = param(
        0.05, "stop an update's remaining minibatches once a minibatch's mean per-token KL exceeds 1.5x this (0: off). "
        "At 0.02 it ended every update of WorldModeling's first ~40k steps on DoorKey-5x5, and so held back the action's learning with the estimate's",
        min=0,
    )
    value_coef: float = param(0.5, "weight of the value loss", min=0)
    value_std_floor: float = param(
        0.1, "floor under the critic's return normaliser's std, in reward units: task returns that are almost all zero "
        "(or world-modeling rewards that are almost all right) would otherwise put a rare return hundreds of stds away",
        above=0,
    )
    value_huber_delta: float = param(
        1.0, "Huber loss on the critic's normalised values, linear beyond this error (0: squared error). A rare success, "
        "many normalised stds away when task returns are almost all zero, otherwise spikes the value loss, and through the shared trunk breaks the format",
        min=0,
    )
    entropy_coef: float = param(0.01, "weight of the token entropy bonus", min=0)
    entropy_over: str = param(
        "slot", "what the entropy bonus spreads probability over: slot (the tokens each slot accepts, renormalised) or vocab "
        "(the whole vocabulary: the bonus then also pays for malformed responses; at 0.01 it collapsed NoThink's format)",
        choices=("slot", "vocab"),
    )
    max_grad_norm: float = param(0.5, "gradient norm clip", above=0)
    turn_gamma: float = param(0.99, "turn-level discount", min=0, max=1)
    turn_lambda: float = param(
        0.95, "turn-level GAE lambda of the turn (or task) rewards; with action_credit=task the world-modeling reward uses 0 (each turn on its own)",
        min=0, max=1,
    )
    token_gamma: float = param(1.0, "token-level discount inside a turn (bilevel only)", min=0, max=1)
    token_lambda: float = param(1.0, "token-level GAE lambda inside a turn (bilevel only)", min=0, max=1)
    state_weight: float = param(0.5, "world-modeling reward of a fully correct state estimate, per turn", min=0)
    prediction_weight: float = param(0.5, "world-modeling reward of a fully correct next-state prediction, per turn",
                                     min=0)
    field_weights: dict[str, float] = param(
        default_factory=lambda: {f: 1.0 for f in FIELDS}, help=f"relative weight of each field in the accuracy: {', '.join(FIELDS)}",
        min=0,
    )
    center_world_model_reward: bool = param(
        True, "subtract the perfect turn's world-modeling reward every turn (a constant shift: no reward for prolonging episodes)"
    )
    format_penalty: float = param(-0.1, "reward of a malformed response (instead of the world-modeling reward)")
    free_think_len: int = param(12, "FreeThink: free tokens before the action (12 = WorldModeling's thinking length)",
                                min=0)
    format_warmup_steps: int = param(
        200, "next-token steps on random well-formed responses before RL: teaches the grammar, no content (0: off)",
        min=0,
    )
    temperature: float = param(1.0, "sampling temperature while collecting rollouts", min=0)
    d_model: int = param(32, "transformer width", min=1)
    layers: int = param(2, "transformer blocks", min=1)
    action_query: bool = param(
        False, "the action's logits also read a learned query token passed through the decoder over the frame alone (NoThink's view), "
        "so acting need not wait for the written estimate to become informative (strategies that write before acting). "
        "On DoorKey-5x5 it raised WorldModeling's score over 5 runs (mean 0.35 against 0.24) but one run's format broke: off until that is fixed"
    )
    action_query_own_blocks: bool = param(
        False, "with action_query: the query goes through decoder blocks of its own, so that learning to write the "
        "estimate and prediction does not move the action's path except through the shared frame encoder"
    )
    heads: int = param(4, "attention heads", min=1)
    history_len: int = param(2, "previous actions the agent sees (its turn history)", min=0)
    pointer_logits: bool = param(True, "cell tokens also score against their tile's embedding (full view only)")
    cell_inputs: bool = param(True, "with pointer_logits: a cell token, once written, is read with its tile's pixel embedding")
    cell_readout: str = param(
        "pixels", "with cell_inputs: the token after a cell also gets in its logits a linear read-out of that tile's pixels (pixels) or pixel embedding (embedding) over the attribute tokens (object kinds, door states, directions); none: off",
        choices=("none", "embedding", "pixels"),
    )
    readout_lr_scale: float = param(3.0, "the cell read-out's learning rate, as a multiple of lr", min=0)
    readout_per_slot: bool = param(
        False, "each slot's cell read-out scores only the attribute tokens the slot accepts (False: every attribute token; "
        "with the action query, 1 run of 5 then broke its format with door_locked in the direction slot; but with it on, WorldModeling "
        "took off on DoorKey-5x5 on 0 of 3 seeds, against 4 of 5 runs off: docs/vagen.md, seventh round)"
    )
    eval_episodes: int = param(32, "real-env episodes of the final evaluation", min=1)
    eval_seed: int = param(1_000_000, "env seed base of evaluation episodes (apart from training seeds)", min=0)
    eval_temperature: float = param(1.0, "sampling temperature in evaluation (0: greedy)", min=0)
    log_every: int = param(1, "updates between scalar logs", min=1)
    checkpoint_every: int = param(10, "updates between resume checkpoints (0: never)", min=0)


# ---------------------------------------------------------------------------------------------
# Envs: N real envs with explicit seeds and manual auto-reset
# ---------------------------------------------------------------------------------------------


@dataclass
class PoolStep:
    """One batched step. frames (N, H, W, 3) and states (N, S): the next observation (a fresh
    episode's first one where an episode ended); next_states (N, S): the state the action led to
    (before any reset); rewards (N,); dones (N,) episode over (terminated or truncated)."""

    frames: np.ndarray
    states: np.ndarray
    next_states: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    terminated: np.ndarray


class RealEnvPool:
    """``num_envs`` MiniGrid envs; episode k of env i resets with ``derive_seed(seed, i, k)``."""

    def __init__(self, env_cfg: Any, num_envs: int, seed: int):
        self.envs = [make_env_from_config(env_cfg) for _ in range(num_envs)]
        self.seed = seed
        self.episodes = [0] * num_envs
        self.frames: np.ndarray | None = None
        self.states: np.ndarray | None = None

    def _reset_one(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        frame, info = self.envs[i].reset(seed=derive_seed(self.seed, i, self.episodes[i]))
        self.episodes[i] += 1
        return frame, info["state"]

    def reset(self) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self._reset_one(i) for i in range(len(self.envs))]
        self.frames = np.stack([p[0] for p in pairs])
        self.states = np.stack([p[1] for p in pairs])
        return self.frames, self.states

    def step(self, actions: np.ndarray) -> PoolStep:
        n = len(self.envs)
        frames, states, next_states = [], [], []
        rewards, dones, terminated = np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, bool)
        for i, (env, action) in enumerate(zip(self.envs, actions)):
            frame, reward, term, trunc, info = env.step(int(action))
            next_states.append(info["state"])
            rewards[i], dones[i], terminated[i] = reward, term or trunc, term
            if term or trunc:
                frame, state = self._reset_one(i)
            else:
                state = info["state"]
            frames.append(frame)
            states.append(state)
        self.frames, self.states = np.stack(frames), np.stack(states)
        return PoolStep(self.frames, self.states, np.stack(next_states), rewards, dones, terminated)


def make_pool(cfg: Any, run: RunDir, seed: int):
    """The env pool the agent trains in: the real env, or the world model's dream by option."""
    vcfg = cfg.vagen
    if vcfg.world == "real":
        env_cfg = cfg.env
        if vcfg.train_max_steps > 0:  # shorter training episodes: more fresh starts; evaluation keeps the env's limit
            env_cfg = OmegaConf.merge(cfg.env, {"max_steps": int(vcfg.train_max_steps)})
        return RealEnvPool(env_cfg, vcfg.num_envs, seed)
    if vcfg.world == "dream":
        return DreamEnvPool(cfg, run, vcfg.num_envs, seed)
    raise ValueError(f"vagen.world must be 'real' or 'dream', got '{vcfg.world}'")


class DreamEnvPool:
    """The dream: ``num_envs`` episodes imagined by the world model of ``vagen.world_model`` (a run
    folder with ``tokenizer.pt`` and ``dynamics.pt``; default: this run). Episodes start from real
    first frames (real env resets), then the model steps them; frames are the tokenizer's decoding.
    The "true" states that score the agent's estimates and predictions are the model's state head:
    the model's truth, not the world's. Episodes end when the model predicts termination or after
    the real env's step limit. Same interface as :class:`RealEnvPool`."""

    def __init__(self, cfg: Any, run: RunDir, num_envs: int, seed: int):
        try:
            from worldmodel.imagine import EnvStarts, load_world_model
        except ImportError as error:
            raise RuntimeError(f"vagen.world=dream needs worldmodel.imagine, which does not import: {error}") from error
        folder = Path(cfg.vagen.world_model) if cfg.vagen.world_model else run.path
        for name in ("tokenizer.pt", "dynamics.pt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"vagen.world=dream needs {folder / name}: train the tokenizer and dynamics model first, "
                    "or point vagen.world_model at a run folder that has them"
                )
        self.model = load_world_model(folder, device=cfg.run.device)
        self.starts = EnvStarts(lambda: make_env_from_config(cfg.env), self.model.tokenizer)
        self.rng = np.random.default_rng(seed)
        self.model.seed(seed)
        self.num_envs = num_envs
        self.max_steps = make_env_from_config(cfg.env).unwrapped.max_steps
        self.elapsed = np.zeros(num_envs, dtype=np.int64)
        self.seed = seed

    def _current(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.model.state is not None
        return self.model.decode(), self.model.state.cpu().numpy()

    def reset(self) -> tuple[np.ndarray, np.ndarray]:
        self.rng = np.random.default_rng(self.seed)
        tokens, _ = self.starts.sample(self.rng, self.num_envs)
        self.model.reset(tokens)
        self.elapsed[:] = 0
        return self._current()

    def step(self, actions: np.ndarray) -> PoolStep:
        result = self.model.step(actions)
        next_states = result.state.cpu().numpy()
        rewards = result.reward.cpu().numpy().astype(np.float32)
        terminated = result.terminated.cpu().numpy().astype(bool)
        self.elapsed += 1
        dones = terminated | (self.elapsed >= self.max_steps)
        if dones.any():
            tokens, _ = self.starts.sample(self.rng, int(dones.sum()))
            self.model.reset_rows(dones, tokens)
            self.elapsed[dones] = 0
        frames, states = self._current()
        return PoolStep(frames, states, next_states, rewards, dones, terminated)


class ValueNormalizer:
    """The critic predicts returns in normalised units (running mean and std of the value targets),
    so its output scale does not depend on how dense the world-modeling reward is: with centred
    per-turn rewards the returns reach -0.2 / (1 - gamma), which a zero-initialised value head
    would need thousands of updates to reach."""

    def __init__(self, momentum: float = 0.9, std_floor: float = 1e-3):
        self.momentum, self.std_floor = momentum, std_floor
        self.mean, self.std, self.initialised = 0.0, 1.0, False

    def update(self, targets: torch.Tensor, head: torch.nn.Linear | None = None, row: int = 0) -> None:
        """Move the running statistics towards those of ``targets``. With ``head`` (the critic's
        last layer, outputs in normalised units) rescale it so that its denormalised outputs stay
        what they were (PopArt): otherwise every shift of the statistics shifts every value."""
        old_mean, old_std = self.mean, self.std
        # The floor: where nearly every return is the same (no success yet, every response right),
        # the std would shrink towards zero and a rare return would land hundreds of stds away.
        mean, std = float(targets.mean()), float(targets.std().clamp_min(self.std_floor)) if targets.numel() > 1 else 1.0
        if not self.initialised:
            self.mean, self.std, self.initialised = mean, std, True
        else:
            self.mean = self.momentum * self.mean + (1 - self.momentum) * mean
            self.std = self.momentum * self.std + (1 - self.momentum) * std
        if head is not None:
            with torch.no_grad():  # output ``row`` of the head is this normaliser's stream
                head.weight[row].mul_(old_std / self.std)
                head.bias[row].mul_(old_std).add_(old_mean - self.mean).div_(self.std)

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / self.std

    def denormalize(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.std + self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "initialised": self.initialised}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.std, self.initialised = float(state["mean"]), float(state["std"]), bool(state["initialised"])


# ---------------------------------------------------------------------------------------------
# Evaluation in the real env
# ---------------------------------------------------------------------------------------------


def optimal_return(env: Any, state_array: np.ndarray, codec: StateCodec) -> float:
    """The BFS oracle's return from this state (the normalised score's denominator), NaN if unplannable."""
    from envs.oracle import plan

    actions = plan(codec.decode(state_array))
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


def agent_codec(cfg: Any) -> tuple[StateCodec, Vocab]:
    env = make_env_from_config(cfg.env)
    base = env.unwrapped
    return StateCodec(base.width, base.height), Vocab(base.width, base.height)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def check_config(vcfg: Any) -> None:
    """The vagen section's values: each field's bounds and choices (declared on ``VagenConfig``), then
    what those cannot express; each error names its key. ``scripts.config.validate`` runs it for every
    script; ``train`` again, for callers that build their config another way."""
    check_values(VagenConfig, vcfg, prefix="vagen.")
    if vcfg.d_model % vcfg.heads:
        raise ValueError(f"vagen.d_model: must be a multiple of vagen.heads ({vcfg.heads}), got {vcfg.d_model}")
    unknown = set(vcfg.field_weights) - set(FIELDS)
    if unknown:
        raise ValueError(f"vagen.field_weights: unknown fields {sorted(unknown)}; fields are {FIELDS}")


def train(cfg: Any, run: RunDir) -> dict[str, Any]:
    """Train the agent of ``cfg.vagen`` in run folder ``run``; write ``vagen.pt`` and return the
    final evaluation (also merged into ``metrics.json`` under ``vagen``)."""
    vcfg = cfg.vagen
    check_config(vcfg)
    final_path, resume_path = run / "vagen.pt", run / "vagen.resume.pt"

    # --- set-up -----------------------------------------------------------------------------------
    seed_everything(cfg.run.seed)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    generator = torch.Generator().manual_seed(derive_seed(cfg.run.seed, 1))
    codec, vocab = agent_codec(cfg)
    pool = make_pool(cfg, run, seed=derive_seed(cfg.run.seed, 2))
    frames, states = pool.reset()
    length = len(template(vcfg.strategy, vcfg.free_think_len))
    # Two value streams when the action's credit is split from the world-modeling reward (task,
    # task_and_own_turn) and there is one (StateEstimation, TransitionModeling, WorldModeling).
    split = vcfg.action_credit != "turn" and full_world_model_reward(vcfg.strategy, vcfg.state_weight, vcfg.prediction_weight) > 0
    field_credit = split and vcfg.world_model_credit == "field"  # each thinking token credited with its own field's share
    model_config = VagenModelConfig(
        vocab_size=len(vocab), grid_width=codec.width, grid_height=codec.height, tile_size=cfg.env.tile_size,
        max_response_len=length, history_len=vcfg.history_len, d_model=vcfg.d_model, layers=vcfg.layers, heads=vcfg.heads,
        first_cell_token=vocab.cell(0, 0) if vcfg.pointer_logits else -1, detach_critic=vcfg.detach_critic,
        cell_inputs=vcfg.cell_inputs, cell_readout=vcfg.cell_readout, readout_tokens=vocab.attribute_tokens,
        readout_positions=readout_positions(vcfg.strategy, vocab, vcfg.free_think_len),
        readout_tokens_at=readout_tokens_at(vcfg.strategy, vocab, vcfg.free_think_len) if vcfg.readout_per_slot else None,
        value_streams=2 if split else 1, action_query=vcfg.action_query, action_query_own_blocks=vcfg.action_query_own_blocks,
    )
    net = VagenNet(model_config)
    value_norms = [ValueNormalizer(std_floor=vcfg.value_std_floor) for _ in range(2 if split else 1)]  # task (or turn) reward; world-modeling reward
    readout = [p for name, p in net.named_parameters() if name.startswith("cell_readout.")]
    others = [p for name, p in net.named_parameters() if not name.startswith("cell_readout.")]
    groups = [{"params": others, "lr": vcfg.lr, "base_lr": vcfg.lr}]
    if readout:
        groups.append({"params": readout, "lr": vcfg.lr * vcfg.readout_lr_scale, "base_lr": vcfg.lr * vcfg.readout_lr_scale})
    optimizer = torch.optim.Adam(groups, lr=vcfg.lr, eps=1e-5)
    actor_params = [p for name, p in net.named_parameters() if not name.startswith("value_head.")]
    entropy_mask = slot_mask(vcfg.strategy, vocab, vcfg.free_think_len) if vcfg.entropy_over == "slot" else None

    def whiten(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_whiten(advantages, mask, per_position=vcfg.advantage_norm == "per_position", std_floor=vcfg.advantage_std_floor)

    steps_per_update = vcfg.num_envs * vcfg.rollout_turns
    num_updates = max(1, math.ceil(vcfg.total_env_steps / steps_per_update))
    offset = full_world_model_reward(vcfg.strategy, vcfg.state_weight, vcfg.prediction_weight) if vcfg.center_world_model_reward and not split else 0.0
    field_weights = dict(vcfg.field_weights)
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
        pool.seed = derive_seed(cfg.run.seed, 2, start_update)
        frames, states = pool.reset()
    elif vcfg.format_warmup_steps > 0:
        _format_warmup(net, vcfg, vocab, frames, generator)

    history = np.full((vcfg.num_envs, vcfg.history_len), NUM_ACTIONS, dtype=np.int64)
    T, N = vcfg.rollout_turns, vcfg.num_envs
    ep_return, ep_len = np.zeros(N), np.zeros(N, int)
    recent: deque = deque(maxlen=2 * N)  # (return, length, success) of the last finished real episodes
    started = time.time()
    for update in range(start_update, num_updates):
        # --- rollout: T turns in N envs ----------------------------------------------------------
        net.eval()
        buf_frames = np.zeros((T, *frames.shape), np.uint8)
        buf_history = np.zeros((T, N, vcfg.history_len), np.int64)
        buf_tokens = torch.zeros(T, N, length, dtype=torch.long)
        buf_mask = torch.zeros(T, N, length, dtype=torch.bool)
        buf_logprobs, buf_values = torch.zeros(T, N, length), torch.zeros(T, N, length, len(value_norms))
        buf_rewards, buf_dones = torch.zeros(T, N), torch.zeros(T, N, dtype=torch.bool)
        buf_wm_rewards = torch.zeros(T, N)  # with split credit: the world-modeling reward, apart
        buf_slot_rewards = torch.zeros(T, N, length)  # and each slot's share of it (world_model_credit=field)
        buf_formed = torch.ones(T, N, dtype=torch.bool)
        stats: dict[str, list[float]] = {k: [] for k in ("state_acc", "pred_acc", "format", "wm_reward")}
        for t in range(T):
            buf_frames[t], buf_history[t] = frames, history
            gen = generate(
                net, torch.from_numpy(frames), torch.from_numpy(history), length, vocab.first_action, generator, vcfg.temperature
            )
            lengths = gen.mask.sum(-1).tolist()
            parsed = [parse_response(gen.tokens[i, : lengths[i]].tolist(), vcfg.strategy, vocab, vcfg.free_think_len) for i in range(N)]
            actions = np.array([p.action for p in parsed], dtype=np.int64)
            step = pool.step(actions)
            for i in range(N):
                truth, next_truth = state_fields(states[i], codec, vocab), state_fields(step.next_states[i], codec, vocab)
                wm = world_model_reward(
                    parsed[i], vcfg.strategy, truth, next_truth,
                    state_weight=vcfg.state_weight, prediction_weight=vcfg.prediction_weight,
                    field_weights=field_weights, format_penalty=vcfg.format_penalty,
                )
                for part, said, true in (("state", parsed[i].state, truth), ("prediction", parsed[i].prediction, next_truth)):
                    if said is not None:  # per-field accuracy of well-formed responses (which fields lag)
                        for f in FIELDS:
                            stats.setdefault(f"{part}_{f}", []).append(float(said[f] == true[f]))
                if split:  # the task reward; the world-modeling reward (or the format penalty) apart
                    buf_rewards[t, i] = float(step.rewards[i])
                    buf_wm_rewards[t, i] = wm.reward
                    buf_formed[t, i] = parsed[i].well_formed
                    if field_credit and wm.slot_rewards is not None:
                        buf_slot_rewards[t, i] = torch.tensor(wm.slot_rewards)
                else:
                    buf_rewards[t, i] = float(step.rewards[i]) + wm.reward - offset
                stats["state_acc"].append(wm.state_accuracy)
                stats["pred_acc"].append(wm.prediction_accuracy)
                stats["format"].append(float(parsed[i].well_formed))
                stats["wm_reward"].append(wm.reward)
            buf_tokens[t], buf_mask[t], buf_logprobs[t] = gen.tokens, gen.mask, gen.logprobs
            buf_values[t] = _denormalize(value_norms, gen.values)
            buf_dones[t] = torch.from_numpy(step.dones)
            # The turn history: shift in the executed action; a new episode starts with none.
            ep_return += step.rewards
            ep_len += 1
            history = np.concatenate([history[:, 1:], actions[:, None]], axis=1) if vcfg.history_len else history
            for i in np.nonzero(step.dones)[0]:
                recent.append((ep_return[i], ep_len[i], float(step.terminated[i] and step.rewards[i] > 0)))
                ep_return[i], ep_len[i] = 0.0, 0
                history[i] = NUM_ACTIONS
            frames, states = step.frames, step.states
        # Bootstrap: the value at the last token of a response to the next observation.
        boot = generate(net, torch.from_numpy(frames), torch.from_numpy(history), length, vocab.first_action, generator, vcfg.temperature)
        boot_values = _denormalize(value_norms, boot.values)[..., 0]
        last_value = boot_values.gather(-1, (boot.mask.sum(-1, keepdim=True) - 1)).squeeze(-1)

        # --- advantages ---------------------------------------------------------------------------
        to_nt = lambda x: x.transpose(0, 1)  # noqa: E731  (T, N, ...) -> (N, T, ...)
        advantages, returns = _advantages(
            to_nt(buf_rewards), to_nt(buf_dones), to_nt(buf_values[..., 0]), to_nt(buf_mask), last_value,
            vcfg.advantage, vcfg.turn_gamma, vcfg.turn_lambda, vcfg.token_gamma, vcfg.token_lambda,
        )
        stream_returns, stream_masks = [returns], [to_nt(buf_mask)]  # one entry per value stream
        advantages = whiten(advantages, to_nt(buf_mask))
        if split:
            wm_adv, wm_ret, think = _world_model_advantages(
                to_nt(buf_wm_rewards), to_nt(buf_values[..., 1]), to_nt(buf_mask), to_nt(buf_tokens), to_nt(buf_formed), vocab.first_action, vcfg,
                credit_action=vcfg.action_credit == "task_and_own_turn",
                slot_rewards=to_nt(buf_slot_rewards) if field_credit else None,
            )
            # Each stream whitened on its own: the dense world-modeling advantages would otherwise
            # set the scale and shrink the sparse task reward's signal on the action.
            advantages = advantages + whiten(wm_adv, think)
            stream_returns.append(wm_ret)
            stream_masks.append(think)
        returns, value_mask = torch.stack(stream_returns, -1), torch.stack(stream_masks, -1)  # (N, T, L, streams)
        flat = lambda x: x.reshape(N * T, *x.shape[2:])  # noqa: E731
        b_frames = torch.from_numpy(buf_frames.swapaxes(0, 1).reshape(N * T, *frames.shape[1:]))
        b_history = torch.from_numpy(buf_history.swapaxes(0, 1).reshape(N * T, vcfg.history_len))
        b_tokens, b_mask = flat(to_nt(buf_tokens)), flat(to_nt(buf_mask))
        for k, norm in enumerate(value_norms):
            norm.update(returns[..., k][value_mask[..., k]], net.value_head[-1] if vcfg.popart else None, row=k)
        returns = torch.stack([norm.normalize(returns[..., k]) for k, norm in enumerate(value_norms)], -1)
        b_logprobs, b_adv, b_ret, b_vmask = flat(to_nt(buf_logprobs)), flat(advantages), flat(returns), flat(value_mask)

        # --- PPO on token log-probs -----------------------------------------------------------------
        net.train()
        if vcfg.lr_schedule == "linear":
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * (1.0 - update / num_updates)
        parts: dict[str, list[float]] = {}
        order_gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, 3, update))
        stopped = False
        for _ in range(vcfg.epochs):
            if stopped:
                break
            order = torch.randperm(N * T, generator=order_gen)
            for lo in range(0, N * T, vcfg.minibatch_turns):
                idx = order[lo : lo + vcfg.minibatch_turns]
                logprobs, entropy, values = token_logprobs(net, b_frames[idx], b_history[idx], b_tokens[idx], entropy_mask)
                values = values.reshape(*logprobs.shape, -1)  # (M, L, streams), one stream included
                losses = ppo_loss(
                    logprobs, b_logprobs[idx], b_adv[idx], values, b_ret[idx], entropy, b_mask[idx],
                    clip=vcfg.clip, value_coef=vcfg.value_coef, entropy_coef=vcfg.entropy_coef, value_mask=b_vmask[idx],
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
                torch.nn.utils.clip_grad_norm_(net.value_head.parameters(), vcfg.max_grad_norm)
                optimizer.step()
                for k, v in losses.parts.items():
                    parts.setdefault(k, []).append(v)
        parts["early_stop"] = [float(stopped)]

        # --- log and checkpoint ---------------------------------------------------------------------
        env_steps = (update + 1) * steps_per_update
        if (update + 1) % vcfg.log_every == 0 or update + 1 == num_updates:
            scalars = {f"loss/{k}": float(np.mean(v)) for k, v in parts.items()}
            scalars.update(
                {
                    "rollout/format_rate": float(np.mean(stats["format"])),
                    "rollout/state_accuracy": _nanmean(stats["state_acc"]),
                    "rollout/prediction_accuracy": _nanmean(stats["pred_acc"]),
                    "rollout/world_model_reward": float(np.mean(stats["wm_reward"])),
                    f"rollout/{return_name}": _nanmean([r[0] for r in recent]),
                    "rollout/episode_length": _nanmean([r[1] for r in recent]),
                    "rollout/success_rate": _nanmean([r[2] for r in recent]),
                    "rollout/turn_reward": float(buf_rewards.mean()),
                    "speed/env_steps_per_s": (env_steps - start_update * steps_per_update) / (time.time() - started),
                }
            )
            scalars.update({f"fields/{k}": float(np.mean(v)) for k, v in stats.items() if k.startswith(("state_", "prediction_")) and k not in ("state_acc",) and v})
            logger.scalars(env_steps, scalars)
            if cfg.run.progress:
                print(
                    f"[vagen] update {update + 1}/{num_updates} steps {env_steps}: {return_name} {scalars[f'rollout/{return_name}']:.3f} "
                    f"success {scalars['rollout/success_rate']:.2f} format {scalars['rollout/format_rate']:.2f} "
                    f"state_acc {scalars['rollout/state_accuracy']:.3f} pred_acc {scalars['rollout/prediction_accuracy']:.3f} "
                    f"({scalars['speed/env_steps_per_s']:.0f} steps/s)"
                    + "".join(f" {k[7:]} {v:.2f}" for k, v in scalars.items() if k.startswith("fields/")),
                    flush=True,
                )
        if vcfg.checkpoint_every > 0 and (update + 1) % vcfg.checkpoint_every == 0 and update + 1 < num_updates:
            atomic_torch_save(
                resume_path,
                {"net": net.state_dict(), "value_norms": [n.state_dict() for n in value_norms], "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "update": update + 1,
                 "stage_identity": run.stage_identity},
            )

    # --- evaluate and save ---------------------------------------------------------------------------
    agent = VagenAgent(
        net, vcfg.strategy, vocab, vcfg.free_think_len, vcfg.eval_temperature,
        config=OmegaConf.to_container(cfg, resolve=True), name=f"vagen-{vcfg.strategy}",
    )
    metrics = evaluate(agent, cfg, vcfg.eval_episodes, vcfg.eval_seed)
    metrics.update(
        {
            "strategy": vcfg.strategy, "advantage": vcfg.advantage, "world": vcfg.world, "env_id": cfg.env.id,
            "env_steps": num_updates * steps_per_update, "train_seconds": time.time() - started,
            "chance_state_accuracy": chance_state_accuracy(vocab, field_weights), "truth": truth_source,
        }
    )
    logger.scalars(num_updates * steps_per_update, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)})
    logger.close()
    save_policy(final_path, agent, env_id=cfg.env.id, metrics=metrics)
    if resume_path.is_file():
        resume_path.unlink()
    run.update_metrics("vagen", metrics)
    print(f"[vagen] evaluation over {metrics['episodes']} real episodes: {metrics}")
    return metrics


def _denormalize(norms: list[ValueNormalizer], values: torch.Tensor) -> torch.Tensor:
    """The critic's outputs (B, L) or (B, L, S) in return units, (B, L, S): one stream included."""
    values = values.reshape(*values.shape[:2], len(norms))
    return torch.stack([norm.denormalize(values[..., k]) for k, norm in enumerate(norms)], -1)


def _advantages(
    rewards, dones, values, mask, last_value, advantage: str, turn_gamma: float, turn_lambda: float, token_gamma: float, token_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (N, T, L) of turn rewards: bi-level GAE or turn-level only."""
    if advantage == "bilevel":
        advantages, returns, _ = bilevel_gae(
            rewards, dones, values, mask, last_value,
            turn_gamma=turn_gamma, turn_lambda=turn_lambda, token_gamma=token_gamma, token_lambda=token_lambda,
        )
    else:
        advantages, returns, _ = turn_level_advantages(rewards, dones, values, mask, last_value, turn_gamma=turn_gamma, turn_lambda=turn_lambda)
    return advantages, returns


def _world_model_advantages(
    rewards, values, mask, tokens, well_formed, first_action: int, vcfg, credit_action: bool = False, slot_rewards=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split credit: the world-modeling reward of a turn (the format penalty for a malformed
    response) credits that turn's tokens before the action, each turn on its own (a turn's
    estimate and prediction do not change later turns' accuracy rewards: turn discount 0). In a
    malformed response the action token is credited too: writing it too early is what broke the
    format; with ``credit_action`` it always is (the action then learns to carry out the prediction
    written before it). The same bi-level (or turn-level-only) scheme as the turn rewards, over those tokens.
    With ``slot_rewards`` (N, T, L: each slot's share of a well-formed turn's reward) every credited
    token of a well-formed response has its own slot's reward as its return instead (the action, when
    credited, the whole turn's), and every token of a malformed one the penalty.
    rewards (N, T), values (N, T, L), mask and tokens (N, T, L), well_formed (N, T) -> advantages
    and returns (N, T, L), zero off the credited tokens, and their mask (N, T, L)."""
    think = mask & ((tokens < first_action) | ~well_formed.unsqueeze(-1) | credit_action)
    if slot_rewards is not None:
        is_action = tokens >= first_action
        returns = torch.where(well_formed.unsqueeze(-1) & ~is_action, slot_rewards, rewards.unsqueeze(-1).to(values.dtype))
        keep = think.to(values.dtype)
        return (returns - values) * keep, returns * keep, think
    has_thought = think.any(-1)
    padded = think.clone()
    padded[..., 0] |= ~has_thought  # a response that acted at once: a stand-in token, zeroed below
    no_bootstrap = torch.ones_like(rewards, dtype=torch.bool)
    zero = torch.zeros(rewards.shape[0], dtype=values.dtype)
    advantages, returns = _advantages(
        rewards, no_bootstrap, values, padded, zero, vcfg.advantage, 0.0, 0.0, vcfg.token_gamma, vcfg.token_lambda
    )
    keep = think.to(values.dtype)
    return advantages * keep, returns * keep, think


def _format_warmup(net: VagenNet, vcfg: Any, vocab: Vocab, frames: np.ndarray, generator: torch.Generator) -> None:
    """Next-token steps on responses with a uniformly random token in every slot.

    A pretrained language model brings the response format to VAGEN; a network trained from
    scratch brings nothing, and with ~10^-8 odds of sampling a well-formed 13-token response every
    turn earns the same format penalty and PPO gets no signal. Random content teaches the grammar
    and nothing about the world (every field value, every action equally likely)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    frames_t = torch.from_numpy(frames)
    net.train()
    for _ in range(vcfg.format_warmup_steps):
        batch = 64
        rows = torch.randint(len(frames_t), (batch,), generator=generator)
        tokens = random_well_formed(vcfg.strategy, vocab, batch, generator, vcfg.free_think_len)
        history = torch.randint(NUM_ACTIONS + 1, (batch, vcfg.history_len), generator=generator)
        logprobs, _, _ = token_logprobs(net, frames_t[rows], history, tokens)
        loss = -logprobs.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(f"[vagen] format warm-up: {vcfg.format_warmup_steps} steps, final next-token loss {loss.item():.3f}")
