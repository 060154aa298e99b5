"""Training loop of the frame tokenizer (the model is in :mod:`worldmodel.tokenizer`).

Reads top to bottom: set-up (data → unique tiles, model, optimiser, resume), loop (sample tiles,
``compute_loss``, step, log, checkpoint), evaluate (exactness on validation frames, images), save.

Why it trains on *tiles*, not frames: the tokenizer is per-patch, so a frame's loss is the sum of
its tiles' losses. A gridworld has a few dozen distinct tiles, of which walls and floor make up
most of every frame, while a door being opened or the agent standing in a doorway appears in a
handful of frames. Deduplicating the tiles and sampling them with weight ``count ** sampling_power``
(0: uniform over distinct tiles) gives the rare tiles as many updates as the common ones, which is
what exactness on every frame needs, and makes a training step cost a few hundred tiles.

Why the encoder is not trained by default (``encoder_lr_scale: 0``): per-tile features from the
He-initialised, data-normalised encoder already tell every distinct tile apart, and the VQ codebook
is seeded on them. Training the encoder on the reconstruction loss (at full or 0.1x rate) pulled the
tiles' latents together in the first 50 steps, merging 14 distinct tiles into 1-5 codes, which no
decoder can undo (measured on DoorKey-6x6, docs/tokenizer.md). The codebook and decoder still learn.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.atomic import atomic_torch_save
from common.config import ConfigError, param
from common.runs import Logger, RunDir
from common.seeding import seed_everything
from common.stage import check_finite, load_resume
from worldmodel.tokenizer import (
    DECODER_OUTPUTS,
    QUANTIZERS,
    Tokenizer,
    TokenizerConfig,
    difference_panel,
    frames_to_patches,
    reconstruction_stats,
    tokenizer_checkpoint,
)

FINAL_NAME = "tokenizer.pt"
RESUME_NAME = "tokenizer.resume.pt"


@dataclass
class TokenizerStageConfig:
    """The tokenizer: model shape and training (scripts/train_tokenizer.py)."""

    # ---- model
    quantizer: str = param("vq", "bottleneck: vq (vector quantisation with codebook care) or fsq (finite scalar quantisation)",
                           choices=QUANTIZERS)
    fsq_levels: list[int] = param(default_factory=lambda: [8, 8, 8], help="fsq: levels per latent channel (vocab = product)",
                                  min=2)
    codebook_size: int = param(64, "vq: number of codes (the vocabulary)", min=2)
    code_dim: int = param(16, "vq: width of a code vector", min=1)
    commitment_weight: float = param(0.25, "vq: weight of the commitment loss", min=0)
    dead_code_threshold: float = param(0.01, "vq: restart codes whose usage EMA (hits per step) falls below this", min=0)
    decoder_output: str = param("categorical", "decoder output: categorical (256-way per pixel channel) or regression (MSE, rounded)",
                                choices=DECODER_OUTPUTS)
    intensity_dim: int = param(16, "categorical decoder: feature width per pixel channel", min=1)
    hidden_dim: int = param(64, "width of the per-tile encoder and decoder", min=1)
    num_layers: int = param(2, "hidden 1x1 layers in the encoder and in the decoder", min=0)
    # ---- training
    steps: int = param(3000, "maximum optimiser steps", min=1)
    batch_size: int = param(64, "tiles per step (sampled from the distinct tiles)", min=1)
    learning_rate: float = param(3e-3, "AdamW learning rate (cosine decay to 10% over `steps`)", above=0)
    encoder_lr_scale: float = param(0.0, "encoder learning rate / learning_rate (0: keep the He + data-normalised init, see module doc)",
                                    min=0)
    weight_decay: float = param(0.0, "AdamW weight decay", min=0)
    sampling_power: float = param(0.0, "tile sampling weight = count ** power (0: uniform over distinct tiles)")
    stop_when_exact: bool = param(True, "stop as soon as every distinct training tile is reconstructed exactly")
    eval_every: int = param(100, "steps between exactness checks (and early-stop checks)", min=1)
    log_every: int = param(50, "steps between loss logs", min=1)
    image_every: int = param(1000, "steps between reconstruction images (real | reconstructed | difference)", min=1)
    num_images: int = param(4, "validation frames in each reconstruction image", min=1)
    checkpoint_every: int = param(500, "steps between resume checkpoints (<run>/tokenizer.resume.pt)", min=1)
    max_val_frames: int = param(2000, "validation frames used for the exactness check", min=1)


def model_config(stage: Any, tile_size: int) -> TokenizerConfig:
    """The model config of a stage config; the patch size is the env's tile size (one token per tile)."""
    return TokenizerConfig(
        patch_size=int(tile_size),
        hidden_dim=int(stage.hidden_dim),
        num_layers=int(stage.num_layers),
        quantizer=str(stage.quantizer),
        fsq_levels=[int(v) for v in stage.fsq_levels],
        codebook_size=int(stage.codebook_size),
        code_dim=int(stage.code_dim),
        commitment_weight=float(stage.commitment_weight),
        dead_code_threshold=float(stage.dead_code_threshold),
        decoder_output=str(stage.decoder_output),
        intensity_dim=int(stage.intensity_dim),
    )


def unique_tiles(frames: np.ndarray, patch_size: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """frames (N, H, W, 3) uint8 -> (distinct tiles (K, p, p, 3) uint8, counts (K,) int64), sorted.

    ``chunk`` frames at a time: a copy of every tile of 100k DoorKey-16x16 frames (4.9 GB, and as
    much again to sort it) got the stage killed for memory on a 24 GB machine."""
    tiles, counts = [], []
    for start in range(0, len(frames), chunk):
        part, part_counts = _distinct_tiles(np.ascontiguousarray(frames_to_patches(frames[start:start + chunk], patch_size)))
        tiles.append(part)
        counts.append(part_counts)
    if not tiles:
        return np.zeros((0, patch_size, patch_size, 3), np.uint8), np.zeros(0, np.int64)
    merged, inverse = _distinct_tiles(np.concatenate(tiles), inverse=True)
    return merged, np.bincount(inverse, weights=np.concatenate(counts), minlength=len(merged)).astype(np.int64)


def _distinct_tiles(patches: np.ndarray, inverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """patches (M, p, p, 3) -> (distinct ones, sorted by their bytes; their counts, or with
    ``inverse`` each patch's index among them)."""
    as_rows = patches.reshape(len(patches), -1).view(np.dtype((np.void, patches[0].size))).ravel()
    _, first, where, counts = np.unique(as_rows, return_index=True, return_inverse=True, return_counts=True)
    return patches[first], (where.reshape(-1) if inverse else counts.astype(np.int64))


@torch.no_grad()
def evaluate(tokenizer: Tokenizer, frames: np.ndarray, batch_size: int = 512) -> tuple[dict[str, float], np.ndarray]:
    """Reconstruct frames (N, H, W, 3) uint8 through encode → decode; (stats, reconstructions)."""
    recon = np.concatenate([
        tokenizer.decode(tokenizer.encode(frames[i:i + batch_size])).cpu().numpy()
        for i in range(0, len(frames), batch_size)
    ])
    return reconstruction_stats(frames, recon), recon


def train(cfg: Any, run: RunDir, train_frames: np.ndarray, val_frames: np.ndarray | None) -> dict[str, Any]:
    """Train (or resume) the tokenizer of ``cfg.tokenizer`` on uint8 frames.

    ``train_frames`` / ``val_frames``: (N, H, W, 3) uint8. Writes ``<run>/tokenizer.pt``; returns the
    final metrics. Whether the stage needs to run at all is :func:`common.stage.run_stage`'s call.

    Threads: ``run.threads``, or 1 when it is 0. A step here is a few dozen tiles, too small for a
    second thread to help; on the shared 2-core machine at load 9 two threads made a step 7x slower
    (500 vs 68 ms). The caller's thread count is restored afterwards (the quickstart runs every
    stage in one process).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.run.threads) if cfg.run.threads > 0 else 1)
    try:
        return _train(cfg, run, train_frames, val_frames)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: Any, run: RunDir, train_frames: np.ndarray, val_frames: np.ndarray | None) -> dict[str, Any]:
    stage = cfg.tokenizer
    tile_size = int(cfg.env.tile_size)
    final_path, resume_path = run / FINAL_NAME, run / RESUME_NAME
    tiles, counts = unique_tiles(train_frames, tile_size)
    vocab = model_config(stage, tile_size).vocab_size
    if len(tiles) > vocab:
        key = "tokenizer.fsq_levels" if stage.quantizer == "fsq" else "tokenizer.codebook_size"
        raise ConfigError(f"{key}: the training frames hold {len(tiles)} distinct tiles, more than the {vocab} "
                          f"tokens of the vocabulary, so no frame with all of them could be exact: give at least "
                          f"{len(tiles)} (several envs' tiles: data.mix)")
    if val_frames is None or len(val_frames) == 0:
        val_frames = train_frames
    val_frames = val_frames[: int(stage.max_val_frames)]
    # ------------------------------------------------------------------ set-up
    seed_everything(cfg.run.seed)
    device = torch.device(cfg.run.device)
    weights = counts.astype(np.float64) ** float(stage.sampling_power)
    weights /= weights.sum()
    tiles_t = torch.as_tensor(tiles, device=device)
    print(f"tokenizer: {len(train_frames)} training frames {train_frames.shape[1:]}, "
          f"{len(tiles)} distinct tiles, {len(val_frames)} validation frames")

    tokenizer = Tokenizer(model_config(stage, tile_size)).to(device)
    encoder_ids = {id(p) for p in tokenizer.encoder_parameters()}
    optimizer = torch.optim.AdamW(
        [{"params": tokenizer.encoder_parameters(), "lr": float(stage.learning_rate) * float(stage.encoder_lr_scale)},
         {"params": [p for p in tokenizer.parameters() if id(p) not in encoder_ids]}],
        lr=float(stage.learning_rate), weight_decay=float(stage.weight_decay))
    total_steps = int(stage.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(total_steps, 1))))
    rng = np.random.default_rng(cfg.run.seed)
    step, elapsed = 0, 0.0
    state = load_resume(resume_path, run, "tokenizer")
    if state is not None:
        tokenizer.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng.bit_generator.state = state["numpy_rng"]
        step, elapsed = int(state["step"]), float(state["elapsed"])
        print(f"tokenizer: resumed from {resume_path} at step {step}")
    logger = Logger(run, cfg, "tokenizer")

    def save_resume() -> None:
        atomic_torch_save(resume_path, {
            "stage_identity": run.stage_identity, "model": tokenizer.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "numpy_rng": rng.bit_generator.state,
            "step": step, "elapsed": elapsed,
        })

    def log_images(tag: str) -> None:
        shown = val_frames[: int(stage.num_images)]
        _, recon = evaluate(tokenizer, shown)
        logger.image(step, tag, difference_panel(shown, recon))

    # ------------------------------------------------------------------ loop
    tiles_exact = False
    started = time.perf_counter() - elapsed
    while step < total_steps:
        tokenizer.train()
        picks = torch.as_tensor(rng.choice(len(tiles), size=int(stage.batch_size), p=weights), device=device)
        losses = tokenizer.compute_loss(tiles_t[picks])
        check_finite(losses.total, "tokenizer", step + 1, "lower tokenizer.learning_rate")
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizer.step()
        schedule.step()
        step += 1

        if step % int(stage.log_every) == 0 or step == 1:
            logger.scalars(step, {"loss": float(losses.total.detach()), **{k: float(v) for k, v in losses.parts.items()},
                                  "learning_rate": schedule.get_last_lr()[0]})
        if step % int(stage.eval_every) == 0 or step == total_steps:
            tile_stats, _ = evaluate(tokenizer, tiles)
            tiles_exact = tile_stats["exact_frame_rate"] == 1.0
            logger.scalars(step, {"train_tiles_exact_rate": tile_stats["exact_frame_rate"]})
            if cfg.run.progress:
                print(f"tokenizer step {step}: loss {float(losses.total.detach()):.2e}, "
                      f"distinct tiles exact {tile_stats['exact_frame_rate']:.3f}")
            if tiles_exact and stage.stop_when_exact:
                break
        if step % int(stage.image_every) == 0:
            log_images("reconstruction")
        if step % int(stage.checkpoint_every) == 0:
            elapsed = time.perf_counter() - started
            save_resume()
    elapsed = time.perf_counter() - started

    # ------------------------------------------------------------------ evaluate
    tokenizer.eval()
    val_stats, _ = evaluate(tokenizer, val_frames)
    tile_stats, _ = evaluate(tokenizer, tiles)
    used = torch.unique(tokenizer.encode(val_frames)).numel()
    metrics = {
        "steps": step,
        "train_seconds": elapsed,
        "distinct_train_tiles": int(len(tiles)),
        "train_tiles_exact_rate": tile_stats["exact_frame_rate"],
        "val_exact_frame_rate": val_stats["exact_frame_rate"],
        "val_pixel_accuracy": val_stats["pixel_accuracy"],
        "val_psnr": min(val_stats["psnr"], 99.0),  # inf does not fit JSON; 99 dB stands for exact
        "vocab_size": tokenizer.vocab_size,
        "val_codes_used": int(used),
        "identity": tokenizer.identity,
    }
    logger.scalars(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    log_images("reconstruction")
    logger.close()

    # ------------------------------------------------------------------ save
    atomic_torch_save(final_path, tokenizer_checkpoint(tokenizer, metrics=metrics))
    if resume_path.is_file():
        resume_path.unlink()
    run.update_metrics("tokenizer", metrics)
    print(f"tokenizer: {step} steps in {elapsed:.1f} s, validation exact frames {val_stats['exact_frame_rate']:.4f}, "
          f"saved {final_path} ({tokenizer.identity})")
    return metrics
