"""Training loop of the inverse dynamics model (:mod:`worldmodel.inverse`).

Reads the run's dataset and ``tokenizer.pt``, tokenises every frame once, computes every
transition's exact set of consistent actions from its symbolic state (the env stepped with each
action), trains on random batches of transitions and writes ``<run>/inverse.pt`` with the
validation metrics. A run takes seconds to a minute, so there is no resume checkpoint: a killed run
starts over.

Runs unchanged under ``torchrun --nproc_per_node=N`` like the dynamics loop: every rank draws its
own batches from a generator seeded by (seed, rank, step), gradients are averaged, only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from common.atomic import atomic_torch_save
from common.config import param
from common.seeding import seed_everything
from common.stage import check_finite
from envs.dataset import EpisodeDataset
from worldmodel.inverse import (
    InverseConfig,
    InverseDynamics,
    count_parameters,
    dataset_targets,
    evaluate,
    inverse_checkpoint,
)
from worldmodel.train_dynamics import setup_distributed

CHECKPOINT_NAME = "inverse.pt"


@dataclass
class InverseStageConfig:
    """Inverse dynamics: (frame, next frame) -> the actions consistent with the change."""

    dim: int = param(32, "width of the per-cell features", min=1)
    hidden: int = param(256, "hidden width of the read-out MLP", min=1)
    steps: int = param(800, "optimizer steps", min=1)
    batch_size: int = param(256, "transitions per step, over all ranks", min=1)
    lr: float = param(3e-3, "peak learning rate (AdamW, cosine decay to 5%)", above=0)
    weight_decay: float = param(0.01, "AdamW weight decay", min=0)
    log_every: int = param(250, "steps between loss logs", min=1)
    encode_batch: int = param(4096, "frames per tokenizer call when tokenising the dataset", min=1)


def targets_for(cfg: Any, dataset: EpisodeDataset, num_actions: int) -> tuple[np.ndarray, np.ndarray]:
    """(transition indices, exact consistent sets) of ``dataset``, from an env of the config."""
    from envs.make import make_env

    env = make_env(cfg.env.id, obs=cfg.env.obs, tile_size=cfg.env.tile_size)
    env.reset(seed=int(cfg.run.seed))
    return dataset_targets(dataset, env, num_actions)


def _learning_rate(section: Any, step: int) -> float:
    warm = min(1.0, (step + 1) / 50)
    cosine = 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(1.0, step / max(1, section.steps))))
    return float(section.lr * warm * cosine)


def train(cfg: Any, run_dir: Any, dataset: EpisodeDataset | None = None, tokenizer: Any = None,
          log: Any = print) -> dict[str, Any]:
    """Train the inverse model of run ``run_dir`` (a :class:`common.runs.RunDir`; None on ranks > 0).
    Returns the validation metrics (rank 0; {} elsewhere)."""
    from common.runs import Logger
    from envs.dataset import training_folder
    from worldmodel.tokenizer import encode_frames, load_tokenizer

    section = cfg.inverse
    rank, world, device = setup_distributed(cfg.run.device)
    is_main = rank == 0
    if cfg.run.threads > 0:
        torch.set_num_threads(int(cfg.run.threads))
    seed_everything(cfg.run.seed)
    run_path = Path(cfg.run.root) / cfg.run.name
    if section.batch_size % world:
        raise ValueError(f"inverse.batch_size ({section.batch_size}) must divide among {world} ranks")

    # ---- data: tokens and exact consistent sets -------------------------------------------------
    if dataset is None:
        dataset = EpisodeDataset.load(training_folder(cfg))
    if tokenizer is None:
        tokenizer = load_tokenizer(run_path / "tokenizer.pt", tile_size=cfg.env.tile_size,
                                   frame_shape=dataset.frame_shape, device=device)
    num_actions = int(dataset.card.get("num_actions", 7)) if isinstance(dataset.card, dict) else 7
    started = time.perf_counter()
    train_set, val_set = dataset.split(cfg.data.val_fraction, seed=cfg.run.seed)
    val_set = val_set or train_set
    if cfg.data.labelled_fraction < 1:  # trained on the labelled episodes only: the dynamics stage labels the rest
        labelled = train_set.labelled_episodes(float(cfg.data.labelled_fraction), int(cfg.run.seed))
        if not labelled.any():
            raise ValueError("data.labelled_fraction=0 leaves the inverse model no labelled episode to learn from")
        train_set = train_set.select(np.flatnonzero(labelled))
    parts = {}
    for name, part in (("train", train_set), ("val", val_set)):
        part.with_frame_array("tokens", encode_frames(tokenizer, part.arrays["frames"], section.encode_batch))
        index, possible = targets_for(cfg, part, num_actions)
        parts[name] = (part.extras["tokens"][index], part.extras["tokens"][index + 1], possible)
    if is_main:
        log(f"[inverse] {len(parts['train'][0])} train / {len(parts['val'][0])} val transitions, exact sets in "
            f"{time.perf_counter() - started:.1f} s; identifiable {(parts['train'][2].sum(-1) == 1).mean():.3f}")

    # ---- model ----------------------------------------------------------------------------------
    token_shape = tuple(parts["train"][0].shape[1:])
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = InverseDynamics(InverseConfig(vocab_size=int(tokenizer.vocab_size), grid_height=int(token_shape[0]),
                                          grid_width=int(token_shape[1]), num_actions=num_actions,
                                          dim=int(section.dim), hidden=int(section.hidden))).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=section.lr, weight_decay=section.weight_decay)
    wrapped: nn.Module = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    logger = Logger(run_dir, cfg, "inverse") if is_main and run_dir is not None else None
    if is_main:
        log(f"[inverse] {count_parameters(model):,} parameters, tokens {token_shape}, {world} rank(s)")

    # ---- loop -----------------------------------------------------------------------------------
    now, after, possible = (torch.as_tensor(a) for a in parts["train"])
    per_rank = section.batch_size // world
    started = time.perf_counter()
    model.train()
    for step in range(section.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(section, step)
        pick = torch.as_tensor(np.random.default_rng([cfg.run.seed, rank, step]).integers(0, len(now), per_rank))
        logits = wrapped(now[pick].to(device), after[pick].to(device))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, possible[pick].to(device).float())
        check_finite(loss, "inverse", step + 1, "lower inverse.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        if is_main and (done % section.log_every == 0 or done == section.steps):
            if logger is not None:
                logger.scalars(done, {"loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"]})
            log(f"[inverse] step {done}/{section.steps} loss {float(loss.detach()):.5f} "
                f"({time.perf_counter() - started:.0f} s)")
    train_seconds = time.perf_counter() - started

    # ---- evaluation and checkpoint (rank 0) -----------------------------------------------------
    metrics: dict[str, Any] = {}
    if is_main:
        metrics = evaluate(model, *parts["val"])
        metrics["train_seconds"] = round(train_seconds, 2)
        if logger is not None:
            logger.scalars(section.steps, {f"val_{k}": v for k, v in metrics.items()})
            logger.close()
        from omegaconf import OmegaConf

        atomic_torch_save(run_path / CHECKPOINT_NAME, inverse_checkpoint(
            model, tokenizer.identity, metrics=metrics, step=section.steps,
            config=OmegaConf.to_container(cfg, resolve=True) if not dataclasses.is_dataclass(cfg) else dataclasses.asdict(cfg),
        ))
        if run_dir is not None:
            run_dir.update_metrics("inverse", metrics)
        log("[inverse] val: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in metrics.items()))
        log(f"[inverse] wrote {run_path / CHECKPOINT_NAME}")
    if world > 1:
        dist.barrier()
    return metrics
