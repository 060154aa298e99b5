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

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import cli_config
from common.runs import RunDir
from envs.dataset import EpisodeDataset, training_folder
from scripts.config import Config, validate
from worldmodel.train_tokenizer import train


def main(argv: list[str] | None = None) -> dict:
    cfg = cli_config(Config, argv, validate=validate)
    run = RunDir(cfg, "tokenizer", argv)
    folder = training_folder(cfg)
    dataset = EpisodeDataset.load(folder)
    train_set, val_set = dataset.split(cfg.data.val_fraction, seed=cfg.run.seed)
    return train(cfg, run, train_set.frames, None if val_set is None else val_set.frames,
                 data_source=f"{folder.resolve()} (val_fraction {cfg.data.val_fraction}, split seed {cfg.run.seed})")


if __name__ == "__main__":
    main()
