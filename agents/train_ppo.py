"""Train the model-free PPO baseline on the real env: the yardstick for the agents trained in imagination.

Reads top to bottom: set-up (tokenizer, vector env, actor-critic, optimiser, resume, the random
and oracle returns that normalise the score), then the loop, one update per pass:
  1. roll the vector env ``rollout_steps`` steps, acting on the tokens of each frame;
  2. GAE over the rollout (:func:`agents.rl.gae`), a truncated episode bootstrapped from the value of
     its final frame;
  3. ``epochs`` passes of ``minibatches`` clipped-PPO steps (:func:`agents.rl.ppo_loss`);
  4. every ``eval_every`` updates, the policy on ``eval_episodes`` real episodes (steps not counted),
     saved as ``<run>/ppo_checkpoints/step_<update>.pt`` (the evaluator's ``ppo_checkpoints``);
then save. Under ``torchrun`` each process rolls its own envs and DistributedDataParallel averages
the gradients, so one update sees ``world * num_envs * rollout_steps`` real steps; on one process
it is the plain loop. Writes ``<run>/ppo.pt`` (a policy: ``agents.policy.load_policy``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from agents.policy import save_policy
from agents.ppo import ActorCritic, PPOConfig, PPOPolicy, RolloutBatch, explained_variance, linear_schedule
from agents.rl import gae
from common.atomic import atomic_torch_save
from common.seeding import derive_seed
from common.stage import check_finite

FINAL_NAME = "ppo.pt"
RESUME_NAME = "ppo.resume.pt"
CHECKPOINT_FOLDER = "ppo_checkpoints"


def stage_config(cfg: Any) -> PPOConfig:
    values = OmegaConf.to_container(cfg.ppo, resolve=True) if OmegaConf.is_config(cfg.ppo) else asdict(cfg.ppo)
    return PPOConfig(**values)  # type: ignore[arg-type]


def checkpoints_along_training(run_path: Path) -> list[Path]:
    """The policies saved at each evaluation along training, in update order."""
    return sorted((Path(run_path) / CHECKPOINT_FOLDER).glob("step_*.pt"))


def tokenizer_path(cfg: Any) -> Path:
    """The ``tokenizer.pt`` whose tokens the policy reads: ``ppo.tokenizer``'s run folder, or this run's."""
    folder = Path(str(cfg.ppo.tokenizer)) if str(cfg.ppo.tokenizer) else Path(cfg.run.root) / cfg.run.name
    return folder / "tokenizer.pt"


class FrameTokenCache:
    """A tokenizer that remembers the tokens of every frame it has encoded (by the frame's hash).

    A gridworld shows a few hundred distinct frames over and over, and the tokenizer is
    deterministic, so the cache returns exactly the tokenizer's tokens at a fraction of the cost.
    ``encode`` (N, H, W, 3) uint8 -> (N, h, w) int64; ``identity`` and ``vocab_size`` are the tokenizer's.
    """

    def __init__(self, tokenizer: Any, max_entries: int = 200_000):
        self.tokenizer = tokenizer
        self.identity = tokenizer.identity
        self.vocab_size = int(tokenizer.vocab_size)
        self.max_entries = int(max_entries)
        self.table: dict[bytes, np.ndarray] = {}

    def encode(self, frames: Any) -> torch.Tensor:
        frames = np.ascontiguousarray(np.asarray(frames, dtype=np.uint8))
        keys = [hashlib.sha1(frame.tobytes()).digest() for frame in frames]
        missing = [i for i, key in enumerate(keys) if key not in self.table]
        if missing:
            if len(self.table) + len(missing) > self.max_entries:
                self.table.clear()
            encoded = torch.as_tensor(self.tokenizer.encode(frames[missing])).cpu().numpy().astype(np.int64)
            self.table.update({keys[i]: tokens for i, tokens in zip(missing, encoded)})
        return torch.as_tensor(np.stack([self.table[key] for key in keys]))


def make_vector_env(env_cfg: Any, num_envs: int) -> Any:
    """``num_envs`` real envs in one gymnasium SyncVectorEnv that resets a finished env in the same
    step (its last frame in ``info["final_obs"]``), so every row of a rollout is a real transition."""
    import gymnasium as gym

    from envs.make import make_env_from_config

    return gym.vector.SyncVectorEnv([lambda: make_env_from_config(env_cfg) for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def train(cfg: Any, run_dir: Any, tokenizer: Any = None, log: Any = print) -> dict[str, Any]:
    """Train (or resume) PPO of ``cfg.ppo`` on ``cfg.env``; ``run_dir`` is None on ranks > 0.

    ``tokenizer`` defaults to :func:`tokenizer_path`'s. Returns the stage's metrics (rank 0; {}
    elsewhere). Whether the stage runs at all is :func:`common.stage.run_stage`'s call.
    """
    import torch.distributed as dist
    from torch import nn

    from agents.evaluate import normalized_score, reference_returns, run_real
    from common.runs import Logger
    from worldmodel.tokenizer import encode_frames, load_tokenizer
    from worldmodel.train_dynamics import resume_state, start_training

    stage = stage_config(cfg)
    rank, world, device, run_path = start_training(cfg)
    is_main = rank == 0
    final_path, resume_path = run_path / FINAL_NAME, run_path / RESUME_NAME

    # ------------------------------------------------------------------ set-up
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_path(cfg), tile_size=cfg.env.tile_size, device=device)
    tokenizer = FrameTokenCache(tokenizer)
    envs = make_vector_env(cfg.env, stage.num_envs)
    num_actions = int(envs.single_action_space.n)  # the env's own: 3 in Dynamic-Obstacles

    def tokens_of(frames: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(encode_frames(tokenizer, np.asarray(frames)), device=device)

    frames, _ = envs.reset(seed=[derive_seed(cfg.run.seed, rank, i) for i in range(stage.num_envs)])
    tokens = tokens_of(frames)
    grid_shape = tuple(tokens.shape[1:])
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    agent = ActorCritic(stage, tokenizer.vocab_size, grid_shape, num_actions).to(device)  # type: ignore[arg-type]
    optimizer = torch.optim.Adam(agent.parameters(), lr=stage.lr, eps=1e-5)
    per_update = world * stage.batch_size
    num_updates = max(1, math.ceil(stage.total_env_steps / per_update))
    generator = torch.Generator().manual_seed(derive_seed(cfg.run.seed, rank))
    update, env_steps, elapsed, history = 0, 0, 0.0, []
    state = resume_state(resume_path, run_dir, "ppo", rank, world, device, log)
    if state is not None:
        agent.load_state_dict(state["agent"])
        optimizer.load_state_dict(state["optimizer"])
        update, env_steps, elapsed, history = state["update"], state["env_steps"], state["elapsed"], state["history"]
        # The envs' own state is not saved: they restart from fresh seeds of this update.
        frames, _ = envs.reset(seed=[derive_seed(cfg.run.seed, rank, update, i) for i in range(stage.num_envs)])
        tokens = tokens_of(frames)
        generator.manual_seed(derive_seed(cfg.run.seed, rank, update))
        if is_main:
            log(f"[ppo] resumed from {resume_path} at update {update} ({env_steps} env steps)")
    elif is_main and (run_path / CHECKPOINT_FOLDER).exists():  # a fresh start: a killed run's policies are not this run's
        shutil.rmtree(run_path / CHECKPOINT_FOLDER)
    wrapped: nn.Module = agent
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(agent, device_ids=[device] if device.type == "cuda" else None)
    logger = Logger(run_dir, cfg, "ppo") if is_main and run_dir is not None else None

    eval_seeds = [int(cfg.evaluate.seed) + i for i in range(stage.eval_episodes)]
    reference: dict[str, float] = {}
    if is_main:
        reference = reference_returns(cfg.env, eval_seeds, int(cfg.evaluate.seed), env_id=str(cfg.env.id))
        log(f"[ppo] {cfg.env.id}: token grid {grid_shape} of {tokenizer.vocab_size}, {num_actions} actions, "
            f"{num_updates} updates of {world} x {stage.num_envs} envs x {stage.rollout_steps} steps; "
            f"random return {reference['random']:.3f}, oracle {reference['oracle']:.3f}")

    def policy() -> PPOPolicy:
        return PPOPolicy(copy.deepcopy(agent.actor), stage, grid_shape, mode=stage.act_mode,  # type: ignore[arg-type]
                         tokenizer_identity=tokenizer.identity, env_id=str(cfg.env.id), name=f"ppo@{env_steps}",
                         training_step=update, env_steps=env_steps, device=str(device))

    def evaluate() -> dict[str, float]:
        rollouts = run_real(policy(), cfg.env, eval_seeds, tokenizer, policy_seed=int(cfg.evaluate.seed))
        real_return = float(rollouts.returns.mean())
        return {"env_steps": env_steps, "update": update, "real_return": real_return,
                "success": float(rollouts.success.mean()),
                "normalized_score": normalized_score(real_return, reference["random"], reference["oracle"])}

    steps, n = stage.rollout_steps, stage.num_envs
    buffer_tokens = torch.zeros((steps, n, *grid_shape), dtype=torch.long, device=device)
    buffer = {key: torch.zeros((steps, n), device=device) for key in ("actions", "logprobs", "rewards", "dones", "values")}
    episode_returns, episode_lengths = np.zeros(n), np.zeros(n, dtype=np.int64)
    finished: list[tuple[float, int]] = []
    started = time.perf_counter() - elapsed

    # ------------------------------------------------------------------ loop
    while update < num_updates:
        for group in optimizer.param_groups:
            group["lr"] = linear_schedule(stage.lr, stage.lr_final, update / max(num_updates - 1, 1))

        # --- 1. rollout: the policy acts on the tokens of the real frames
        for t in range(steps):
            actions, logprobs, values = agent.act(tokens, generator)
            frames, rewards, terminated, truncated, info = envs.step(actions.cpu().numpy())
            rewards = np.asarray(rewards, dtype=np.float32)
            episode_returns += rewards
            if truncated.any() and "final_obs" in info:
                # A time limit is not an end of the task: bootstrap from the value of the last frame.
                cut = np.flatnonzero(truncated & ~terminated)
                if len(cut):
                    with torch.no_grad():
                        last_values = agent.critic(tokens_of(np.stack([info["final_obs"][i] for i in cut])))
                    rewards[cut] += stage.gamma * last_values.cpu().numpy()
            buffer_tokens[t] = tokens
            buffer["actions"][t], buffer["logprobs"][t], buffer["values"][t] = actions, logprobs, values
            buffer["rewards"][t] = torch.as_tensor(rewards, device=device)
            done = terminated | truncated
            buffer["dones"][t] = torch.as_tensor(done, dtype=torch.float32, device=device)
            episode_lengths += 1
            for i in np.flatnonzero(done):
                finished.append((float(episode_returns[i]), int(episode_lengths[i])))
                episode_returns[i], episode_lengths[i] = 0.0, 0
            tokens = tokens_of(frames)
        env_steps += per_update

        # --- 2. advantages: GAE along each env's row, no bootstrap across an episode's end
        with torch.no_grad():
            last_value = agent.critic(tokens)
        advantages, returns = gae(buffer["rewards"].T, buffer["dones"].T, buffer["values"].T, last_value,
                                  stage.gamma, stage.gae_lambda)
        flat_tokens = buffer_tokens.transpose(0, 1).reshape(n * steps, *grid_shape)
        flat = {"actions": buffer["actions"].T.reshape(-1).long(), "logprobs": buffer["logprobs"].T.reshape(-1),
                "advantages": advantages.reshape(-1), "returns": returns.reshape(-1)}

        # --- 3. optimise: epochs of shuffled minibatches of the clipped loss
        minibatch = stage.batch_size // stage.minibatches
        parts_sum: dict[str, float] = {}
        count = 0
        for _ in range(stage.epochs):
            order = torch.randperm(stage.batch_size, generator=generator)
            for start in range(0, stage.batch_size, minibatch):
                index = order[start:start + minibatch]
                batch = RolloutBatch(flat_tokens[index], flat["actions"][index], flat["logprobs"][index],
                                     flat["advantages"][index], flat["returns"][index])
                total, parts = wrapped(batch)
                check_finite(total, "ppo", update + 1, "lower ppo.lr")
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                parts["grad_norm"] = float(nn.utils.clip_grad_norm_(agent.parameters(), stage.grad_clip))
                optimizer.step()
                for key, value in parts.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + float(value)
                count += 1
        update += 1

        # --- 4. log, evaluate, checkpoint (rank 0)
        if not is_main:
            finished = []
            continue
        scalars = {key: value / count for key, value in parts_sum.items()}
        scalars["lr"] = optimizer.param_groups[0]["lr"]
        scalars["explained_variance"] = explained_variance(buffer["values"].T.reshape(-1), flat["returns"])
        if finished:
            scalars["episode_return"] = float(np.mean([r for r, _ in finished]))
            scalars["episode_length"] = float(np.mean([k for _, k in finished]))
            finished = []
        if logger is not None and (update % stage.log_every == 0 or update == num_updates):
            logger.scalars(env_steps, scalars)
        if stage.eval_every > 0 and update % stage.eval_every == 0 and update < num_updates:
            result = evaluate()
            history.append(result)
            save_policy(run_path / CHECKPOINT_FOLDER / f"step_{update:06d}.pt", policy(), metrics=result)
            if logger is not None:
                logger.scalars(env_steps, {f"eval_{k}": v for k, v in result.items() if k not in ("env_steps", "update")})
            log(f"[ppo] update {update}/{num_updates}, {env_steps} env steps: return {result['real_return']:.3f}, "
                f"success {result['success']:.2f}, normalised {result['normalized_score']:.3f} "
                f"({time.perf_counter() - started:.0f} s)")
        if update % stage.checkpoint_every == 0 and update < num_updates:
            atomic_torch_save(resume_path, {
                "stage_identity": getattr(run_dir, "stage_identity", ""), "agent": agent.state_dict(),
                "optimizer": optimizer.state_dict(), "update": update, "env_steps": env_steps,
                "elapsed": time.perf_counter() - started, "history": history,
            })
    envs.close()
    elapsed = time.perf_counter() - started
    if world > 1:
        dist.barrier()
    if not is_main:
        return {}

    # ------------------------------------------------------------------ final evaluation, save
    result = evaluate()
    history.append(result)
    if logger is not None:
        logger.scalars(env_steps, {f"eval_{k}": v for k, v in result.items() if k not in ("env_steps", "update")})
        logger.close()
    metrics = {
        "updates": update, "env_steps": env_steps, "train_seconds": round(elapsed, 2), "ranks": world,
        "real_return": result["real_return"], "success": result["success"],
        "normalized_score": result["normalized_score"], "random_return": reference["random"],
        "oracle_return": reference["oracle"], "eval_episodes": stage.eval_episodes,
    }
    save_policy(final_path, policy(), metrics=metrics, history=history, reference=reference,
                agent={k: v.cpu() for k, v in agent.state_dict().items()})
    if resume_path.is_file():
        resume_path.unlink()
    if run_dir is not None:
        run_dir.update_metrics("ppo", metrics)
    log(f"[ppo] {env_steps} env steps in {elapsed:.1f} s: return {result['real_return']:.3f}, "
        f"normalised score {result['normalized_score']:.3f}; saved {final_path}")
    return metrics
