#!/usr/bin/env python
"""Stage 2: train the frame tokenizer on the collected dataset.

    python scripts/train_tokenizer.py [--env doorkey-6x6] [--preset tiny] [key=value ...]

Reads ``data.path`` (default ``<run>/dataset`` from scripts/collect.py), writes
``<run>/tokenizer.pt`` (resumable through ``<run>/tokenizer.resume.pt``; skipped when complete),
logs losses and real | reconstructed | difference images to ``<run>/tb`` and ``<run>/media``.
``--help`` lists every config key.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.runs import RunDir, run_path
from common.stage import Stage, config_fields, run_stage
from envs.dataset import EpisodeDataset, training_folder, training_folders
from scripts.stages import dataset_id, main_for, tokenizer_id
from worldmodel.train_tokenizer import FINAL_NAME, train, unique_tiles

# Fields that change what is logged, not what is trained.
COSMETIC = ("tokenizer.log_every", "tokenizer.image_every", "tokenizer.num_images", "tokenizer.checkpoint_every",
            "tokenizer.max_val_frames")


def body(cfg, run_dir: RunDir) -> dict:
    """Train the tokenizer on the training split of the run's dataset; with ``data.mix``, on the
    distinct tiles of every dataset's split (frames of different sizes: the tokenizer reads tiles)."""
    if not cfg.data.mix:
        dataset = EpisodeDataset.load(training_folder(cfg))
        train_set, val_set = dataset.split(cfg.data.val_fraction, seed=cfg.run.seed)
        return train(cfg, run_dir, train_set.frames, None if val_set is None else val_set.frames)
    tile = int(cfg.env.tile_size)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for folder in training_folders(cfg):
        train_set, val_set = EpisodeDataset.load(folder).split(cfg.data.val_fraction, seed=cfg.run.seed)
        for name, split in (("train", train_set), ("val", val_set)):
            if split is not None:
                parts[name].append(unique_tiles(split.frames, tile)[0])
    val = np.concatenate(parts["val"]) if parts["val"] else None
    return train(cfg, run_dir, np.concatenate(parts["train"]), val)


STAGE = Stage(
    name="tokenizer",
    outputs=lambda cfg: [run_path(cfg) / FINAL_NAME],
    identity=lambda cfg: {
        "config": config_fields(cfg, ["tokenizer"], exclude=COSMETIC)
        | {"env.tile_size": int(cfg.env.tile_size), "data.val_fraction": float(cfg.data.val_fraction),
           "run.seed": int(cfg.run.seed)},
        "inputs": {"dataset": dataset_id(cfg)},
    },
    body=body,
    sections=("env", "data", "tokenizer"),
    content=tokenizer_id,
)


def run(cfg, run_dir: RunDir) -> dict:
    """The stage contract: train unless ``tokenizer.pt`` is complete and of this config and data."""
    return run_stage(STAGE, cfg, run_dir)


def main(argv: list[str] | None = None) -> dict:
    return main_for(STAGE, argv)


if __name__ == "__main__":
    main()
