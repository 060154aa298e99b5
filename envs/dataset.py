"""Dataset I/O: episodes in compressed .npz shards with a card, read as fixed-length windows."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import param


@dataclass
class DataConfig:
    """Reading a dataset for training."""

    path: str = param("", "dataset folder to train on (default: <run folder>/dataset)")
    val_fraction: float = param(0.1, "fraction of episodes held out for validation (split by episode)")
