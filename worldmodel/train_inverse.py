"""Training loop of the inverse dynamics model (:mod:`worldmodel.inverse`).

Reads the run's dataset, computes every transition's exact set of consistent actions from its symbolic state (the env stepped with each
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
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from common.atomic import atomic_torch_save
from common.config import param
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
from worldmodel.train_dynamics import start_training

CHECKPOINT_NAME = "inverse.pt"


@dataclass
class InverseStageConfig:
    """Inverse dynamics: (frame, next frame) -> the actions consistent with the change."""

    dim: int = param(32, "width of the per-cell features", min=1)
    layers: int = param(2, "3x3 convolution layers over the grid (each widens a cell's view by one tile)", min=0)
    hidden: int = param(128, "hidden width of the read-out MLP", min=1)
    steps: int = param(1500, "optimizer steps", min=1)
    batch_size: int = param(256, "transitions per step, over all ranks", min=1)
    lr: float = param(1e-2, "peak learning rate (AdamW, cosine decay to 5%)", above=0)
    weight_decay: float = param(0.01, "AdamW weight decay", min=0)
    log_every: int = param(250, "steps between loss logs", min=1)


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


def train(cfg: Any, run_dir: Any, dataset: EpisodeDataset | None = None, log: Any = print) -> dict[str, Any]:
    """Train the inverse model of run ``run_dir`` (a :class:`common.runs.RunDir`; None on ranks > 0).
    Returns the validation metrics (rank 0; {} elsewhere)."""
    from common.runs import Logger
    from envs.dataset import training_folder

    section = cfg.inverse
    rank, world, device, run_path = start_training(cfg, "inverse.batch_size")
    is_main = rank == 0

    # ---- data: frame pairs and exact consistent sets ---------------------------------------------
    if dataset is None:
        dataset = EpisodeDataset.load(training_folder(cfg))
    num_actions = int(dataset.card.get("num_actions", 7)) if isinstance(dataset.card, dict) else 7
    tile = int(cfg.env.tile_size)
    height, width = dataset.frame_shape[0], dataset.frame_shape[1]
    if height % tile or width % tile:
        raise ValueError(f"env.tile_size ({tile}) does not divide the dataset's frames ({height}x{width})")
    started = time.perf_counter()
    train_set, val_set = dataset.split(cfg.data.val_fraction, seed=cfg.run.seed)
    val_set = val_set or train_set
    if cfg.data.labelled_fraction < 1:  # trained on the labelled episodes only: the dynamics stage labels the rest
        labelled = train_set.labelled_episodes(float(cfg.data.labelled_fraction), int(cfg.run.seed))
        if not labelled.any():
            raise ValueError("data.labelled_fraction=0 leaves the inverse model no labelled episode to learn from")
        train_set = train_set.select(np.flatnonzero(labelled))
    parts = {name: (part, *targets_for(cfg, part, num_actions)) for name, part in (("train", train_set), ("val", val_set))}
    if is_main:
        log(f"[inverse] {len(parts['train'][1])} train / {len(parts['val'][1])} val transitions, exact sets in "
            f"{time.perf_counter() - started:.1f} s; identifiable {(parts['train'][2].sum(-1) == 1).mean():.3f}")

    # ---- model ----------------------------------------------------------------------------------
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = InverseDynamics(InverseConfig(tile_size=tile, grid_height=height // tile, grid_width=width // tile,
                                          num_actions=num_actions, dim=int(section.dim), layers=int(section.layers),
                                          hidden=int(section.hidden))).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=section.lr, weight_decay=section.weight_decay)
    wrapped: nn.Module = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    logger = Logger(run_dir, cfg, "inverse") if is_main and run_dir is not None else None
    if is_main:
        log(f"[inverse] {count_parameters(model):,} parameters, {height // tile}x{width // tile} tiles, {world} rank(s)")

    # ---- loop -----------------------------------------------------------------------------------
    part, index, possible_np = parts["train"]
    frames, index_t, possible = torch.as_tensor(part.arrays["frames"]), torch.as_tensor(index), torch.as_tensor(possible_np)
    per_rank = section.batch_size // world
    started = time.perf_counter()
    model.train()
    for step in range(section.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(section, step)
        pick = torch.as_tensor(np.random.default_rng([cfg.run.seed, rank, step]).integers(0, len(index_t), per_rank))
        rows = index_t[pick]
        logits = wrapped(frames[rows].to(device), frames[rows + 1].to(device))
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
        part, index, possible_np = parts["val"]
        metrics = evaluate(model, part.arrays["frames"][index], part.arrays["frames"][index + 1], possible_np)
        metrics["train_seconds"] = round(train_seconds, 2)
        if logger is not None:
            logger.scalars(section.steps, {f"val_{k}": v for k, v in metrics.items()})
            logger.close()
        from omegaconf import OmegaConf

        atomic_torch_save(run_path / CHECKPOINT_NAME, inverse_checkpoint(
            model, metrics=metrics, step=section.steps,
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
