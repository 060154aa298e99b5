"""Train the Dreamer-style agent in imagination only: the real env is never touched.

Reads top to bottom: set-up (tokenizer, world model, dataset tokens, agent, optimiser, resume),
behaviour-cloning warm start (optional), the imagination loop (start frames → imagine → losses →
step), save. Writes ``<run>/dreamer.pt`` (a policy checkpoint, loadable by
``agents.policy.load_policy``) and ``<run>/dreamer_checkpoints/step_NNNNNN.pt`` along training,
which the evaluation stage scores in the real env for the learning curve.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from agents.dreamer import (
    ActorMemory,
    DreamerAgent,
    DreamerConfig,
    DreamerPolicy,
    ImaginationModel,
    Losses,
    RecurrentActor,
    imagine,
    resolve_actor_memory,
)
from agents.policy import save_policy
from common.atomic import atomic_torch_save
from common.runs import Logger, RunDir
from common.seeding import seed_everything
from common.stage import check_finite, load_resume

FINAL_NAME = "dreamer.pt"
RESUME_NAME = "dreamer.resume.pt"
CHECKPOINT_FOLDER = "dreamer_checkpoints"


# ---------------------------------------------------------------------------------------------
# Start frames: every dataset frame from which an action was taken, all along the episodes
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StartFrames:
    """Where imagined rollouts start: dataset frames with ``context_length - 1`` frames before them
    in their episode and an action after them (an episode's last frame is over, not a start).

    tokens (N, h, w) int64 for every dataset frame; actions (N,) int64 (-1 at last frames);
    index (M,) int64: the frames that may start a rollout; near_reward (K,) int64: those of them
    from which the dataset's own episode collected a positive reward within ``reward_window`` steps.
    """

    tokens: np.ndarray
    actions: np.ndarray
    index: np.ndarray
    context_length: int
    near_reward: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    position: np.ndarray | None = None  # (N,) int64: each frame's step in its episode (0: the first)

    @classmethod
    def from_dataset(cls, dataset: Any, tokens: np.ndarray, context_length: int, reward_window: int = 0) -> "StartFrames":
        episode_of = np.repeat(np.arange(len(dataset.episode_starts)), dataset.episode_lengths + 1)
        position = np.arange(dataset.num_frames) - dataset.episode_starts[episode_of]
        valid = (dataset.actions >= 0) & (position >= context_length - 1)
        index = np.flatnonzero(valid)
        if len(index) == 0:
            raise ValueError(f"the dataset has no frame with {context_length - 1} frames before it and an action after it")
        near = np.zeros(0, dtype=np.int64)
        if reward_window > 0:
            # Frames f with a rewarded step g in [f, f + window) of the same episode (the reward of
            # the action taken at g): the few stretches of random data that lead to the goal.
            rewarded = np.flatnonzero(np.asarray(dataset.rewards) > 0)
            lead = rewarded[:, None] - np.arange(reward_window)[None, :]  # (R, window) candidate starts
            lead = lead[(lead >= 0) & (episode_of[np.clip(lead, 0, None)] == episode_of[rewarded][:, None])]
            near = np.intersect1d(lead, index)
        return cls(np.asarray(tokens, dtype=np.int64), np.asarray(dataset.actions, dtype=np.int64), index,
                   int(context_length), near, position.astype(np.int64))

    def draw(self, rng: np.random.Generator, batch_size: int, near_reward_fraction: float = 0.0) -> np.ndarray:
        """(B,) start frames; a share ``near_reward_fraction`` of them from :attr:`near_reward` (where there are any)."""
        last = self.index[rng.integers(0, len(self.index), size=batch_size)]
        near = int(round(near_reward_fraction * batch_size)) if len(self.near_reward) else 0
        if near:
            last[:near] = self.near_reward[rng.integers(0, len(self.near_reward), size=near)]
        return last

    def context(self, last: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Context tokens (B, T0, h, w) ending at the frames ``last`` (B,) and the actions between them (B, T0 - 1)."""
        frames = last[:, None] - np.arange(self.context_length - 1, -1, -1)[None, :]  # (B, T0)
        return torch.as_tensor(self.tokens[frames]), torch.as_tensor(self.actions[frames[:, :-1]])

    def sample(self, rng: np.random.Generator, batch_size: int, near_reward_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`context` of :meth:`draw`."""
        return self.context(self.draw(rng, batch_size, near_reward_fraction))

    def history(self, last: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What a recurrent actor reads before starting at the frames ``last`` (B,): the ``length``
        frames before each in its episode, tokens (B, K, h, w), the action that led to each (B, K)
        (-1 at an episode's first frame), valid (B, K) bool (False before the episode began), and
        the action that led to the start frame itself (B,)."""
        if self.position is None:
            raise ValueError("StartFrames.history needs each frame's position in its episode (build it with from_dataset)")

        def previous_action(frames: np.ndarray) -> np.ndarray:
            return np.where(self.position[frames] >= 1, self.actions[np.clip(frames - 1, 0, None)], -1)

        back = np.arange(length, 0, -1)[None, :]  # (1, K): K .. 1 frames before the start
        valid = self.position[last][:, None] - back >= 0
        frames = np.where(valid, last[:, None] - back, last[:, None])  # invalid ones are never read
        return (torch.as_tensor(self.tokens[frames]), torch.as_tensor(np.where(valid, previous_action(frames), -1)),
                torch.as_tensor(valid), torch.as_tensor(previous_action(last)))

    def behaviour_batch(self, rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, h, w), dataset actions (B,)) for behaviour cloning."""
        picks = self.index[rng.integers(0, len(self.index), size=batch_size)]
        return torch.as_tensor(self.tokens[picks]), torch.as_tensor(self.actions[picks])


def optimizer_for(agent: DreamerAgent, cfg: DreamerConfig) -> torch.optim.Optimizer:
    """One Adam with a parameter group per network (actor and critic share nothing)."""
    return torch.optim.Adam([
        {"params": agent.actor.parameters(), "lr": cfg.actor_lr},
        {"params": agent.critic.parameters(), "lr": cfg.critic_lr},
    ])


def imagination_update(
    agent: DreamerAgent,
    optimizer: torch.optim.Optimizer,
    world_model: ImaginationModel,
    context: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator | None,
    progress: float = 0.0,
    memory: ActorMemory | None = None,
) -> Losses:
    """One update: imagine from ``context`` (tokens (B, T0, h, w), actions (B, T0 - 1)), then one
    gradient step on actor and critic and one slow-critic EMA step. ``progress`` in [0, 1];
    ``memory``: a recurrent actor's state at the starts (default: none, an episode's first frame)."""
    trajectory = imagine(world_model, agent.actor, context[0], context[1], agent.cfg.horizon, generator,
                         doubt_penalty=agent.cfg.doubt_penalty, memory=memory)
    losses = agent.compute_loss(trajectory, progress)
    if trajectory.doubt is not None:
        losses.parts["imagined_doubt"] = float(trajectory.doubt.mean())
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    # Clip each network on its own: a large critic gradient must not shrink the actor's step.
    losses.parts["actor_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(agent.actor.parameters(), agent.cfg.grad_clip))
    losses.parts["critic_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(agent.critic.parameters(), agent.cfg.grad_clip))
    optimizer.step()
    agent.update_slow_critic()
    return losses


def behaviour_cloning_update(agent: DreamerAgent, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> Losses:
    """One supervised step of the actor towards the dataset's actions."""
    losses = agent.bc_loss(*batch)
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    torch.nn.utils.clip_grad_norm_(agent.actor.parameters(), agent.cfg.grad_clip)
    optimizer.step()
    return losses


def stage_config(cfg: Any) -> DreamerConfig:
    """The stage's :class:`DreamerConfig`, ``actor_memory=auto`` resolved for the run's view."""
    values = OmegaConf.to_container(cfg.dreamer, resolve=True) if OmegaConf.is_config(cfg.dreamer) else asdict(cfg.dreamer)
    values["actor_memory"] = resolve_actor_memory(str(values.get("actor_memory", "none")), str(cfg.env.obs))  # type: ignore[index]
    return DreamerConfig(**values)  # type: ignore[arg-type]


def train(cfg: Any, run: RunDir) -> dict[str, Any]:
    """Train (or resume) the agent of ``cfg.dreamer`` in the run's world model.

    Needs ``<run>/tokenizer.pt``, ``<run>/dynamics.pt`` and the dataset; writes ``<run>/dreamer.pt``
    and returns the stage's metrics. Whether the stage needs to run at all is
    :func:`common.stage.run_stage`'s call.
    """
    from envs.dataset import EpisodeDataset, training_folder
    from worldmodel.imagine import load_world_model
    from worldmodel.tokenizer import encode_frames

    stage = stage_config(cfg)
    final_path, resume_path = run / FINAL_NAME, run / RESUME_NAME
    device = str(cfg.run.device)

    # ------------------------------------------------------------------ set-up
    seed_everything(cfg.run.seed)
    if cfg.run.threads > 0:
        torch.set_num_threads(int(cfg.run.threads))
    world_model = load_world_model(run_dir=run.path, device=device)
    tokenizer = world_model.tokenizer

    dataset = EpisodeDataset.load(training_folder(cfg))
    tokens = encode_frames(tokenizer, dataset.frames)
    starts = StartFrames.from_dataset(dataset, tokens, stage.context_length,
                                      reward_window=stage.horizon if stage.near_reward_starts > 0 else 0)
    grid_shape = tuple(tokens.shape[1:])
    agent = DreamerAgent(stage, tokenizer.vocab_size, grid_shape, world_model.num_actions).to(device)  # type: ignore[arg-type]
    optimizer = optimizer_for(agent, stage)
    rng = np.random.default_rng(cfg.run.seed)
    generator = torch.Generator().manual_seed(int(cfg.run.seed))
    step, bc_step, elapsed, history = 0, 0, 0.0, []
    state = load_resume(resume_path, run, "dreamer")
    if state is not None:
        if state["has_prior"]:
            agent.freeze_prior()
        agent.load_state_dict(state["agent"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        generator.set_state(state["torch_rng"])
        step, bc_step, elapsed, history = state["step"], state["bc_step"], state["elapsed"], state["history"]
        print(f"dreamer: resumed from {resume_path} at update {step}")
    elif (run / CHECKPOINT_FOLDER).exists():  # a fresh start: policies a killed run saved are not this run's
        shutil.rmtree(run / CHECKPOINT_FOLDER)
    logger = Logger(run, cfg, "dreamer")
    print(f"dreamer: {len(starts.index)} start frames from {dataset.num_episodes} episodes, token grid {grid_shape}, "
          f"vocabulary {tokenizer.vocab_size}, {stage.updates} updates of {stage.batch_size} x {stage.horizon} imagined steps")

    def policy(at_step: int) -> DreamerPolicy:
        return DreamerPolicy(agent.actor, stage, grid_shape, mode=stage.act_mode, tokenizer_identity=tokenizer.identity,  # type: ignore[arg-type]
                             env_id=str(cfg.env.id), name=f"dreamer@{at_step}", training_step=at_step, device=device)

    def save_resume() -> None:
        atomic_torch_save(resume_path, {
            "stage_identity": run.stage_identity, "agent": agent.state_dict(), "has_prior": agent.prior is not None,
            "optimizer": optimizer.state_dict(), "numpy_rng": rng.bit_generator.state,
            "torch_rng": generator.get_state(), "step": step, "bc_step": bc_step,
            "elapsed": time.perf_counter() - started, "history": history,
        })

    started = time.perf_counter() - elapsed

    # ------------------------------------------------------------------ behaviour-cloning warm start
    while bc_step < stage.bc_steps:
        losses = behaviour_cloning_update(agent, optimizer, starts.behaviour_batch(rng, stage.bc_batch_size))
        bc_step += 1
        check_finite(losses.total, "dreamer behaviour cloning", bc_step, "lower dreamer.actor_lr")
        if bc_step % stage.log_every == 0 or bc_step == stage.bc_steps:
            logger.scalars(bc_step, losses.parts)
    if stage.bc_prior and agent.prior is None:
        agent.freeze_prior()
    agent.actor.train()

    # ------------------------------------------------------------------ imagination loop
    bar = None
    if cfg.run.progress:
        from tqdm import tqdm

        bar = tqdm(total=stage.updates, initial=step, desc="dreamer", unit="update", dynamic_ncols=True)
    while step < stage.updates:
        last = starts.draw(rng, stage.batch_size, stage.near_reward_starts)
        memory = None
        if isinstance(agent.actor, RecurrentActor):  # its memory at the start: the episode so far, read from the dataset
            history_tokens, history_actions, valid, start_actions = starts.history(last, stage.memory_burn_in)
            memory = ActorMemory(agent.actor.burn_in(history_tokens.to(device), history_actions.to(device), valid.to(device)),
                                 start_actions.to(device))
        losses = imagination_update(agent, optimizer, world_model, starts.context(last), generator,
                                    progress=step / max(stage.updates - 1, 1), memory=memory)
        step += 1
        check_finite(losses.total, "dreamer", step, "lower dreamer.actor_lr and dreamer.critic_lr")
        if bar is not None:
            bar.update(1)
        if step % stage.log_every == 0 or step == 1:
            logger.scalars(step, {"loss": float(losses.total.detach()), **losses.parts})
            history.append({"step": step, **{k: losses.parts[k] for k in ("imagined_return", "entropy", "value")}})
            if bar is not None:
                bar.set_postfix(imagined_return=f"{losses.parts['imagined_return']:.3f}",
                                entropy=f"{losses.parts['entropy']:.2f}", refresh=False)
        if step % stage.checkpoint_every == 0 and step < stage.updates:
            save_policy(run / CHECKPOINT_FOLDER / f"step_{step:06d}.pt", policy(step))
            save_resume()
    elapsed = time.perf_counter() - started
    if bar is not None:
        bar.close()
    logger.close()

    # ------------------------------------------------------------------ save
    recent = history[-max(1, len(history) // 10):]
    metrics = {
        "updates": step, "bc_steps": bc_step, "train_seconds": round(elapsed, 2),
        "imagined_return_final": float(np.mean([h["imagined_return"] for h in recent])) if recent else 0.0,
        "entropy_final": float(np.mean([h["entropy"] for h in recent])) if recent else 0.0,
        "actor_update": stage.actor_update, "start_frames": int(len(starts.index)),
        "near_reward_start_frames": int(len(starts.near_reward)),
    }
    save_policy(run / CHECKPOINT_FOLDER / f"step_{step:06d}.pt", policy(step))
    save_policy(final_path, policy(step), metrics=metrics, history=history,
                agent={k: v.cpu() for k, v in agent.state_dict().items()})
    if resume_path.is_file():
        resume_path.unlink()
    run.update_metrics("dreamer", metrics)
    print(f"dreamer: {step} updates in {elapsed:.1f} s, final imagined return {metrics['imagined_return_final']:.3f}, saved {final_path}")
    return metrics


def checkpoints_along_training(run_path: Path) -> list[Path]:
    """The policies saved along training, in update order."""
    return sorted((Path(run_path) / CHECKPOINT_FOLDER).glob("step_*.pt"))
