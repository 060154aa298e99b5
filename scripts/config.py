"""The root config: one section per stage, shared by every script, so a run folder's
``config.yaml`` describes every stage that ran in it. Each section's dataclass lives beside the code
it configures."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import RunConfig, param
from envs.collect import CollectConfig
from envs.dataset import DataConfig
from envs.make import EnvConfig


@dataclass
class Config:
    """Everything a run needs."""

    run: RunConfig = param(default_factory=RunConfig, help="run folder, seed, device, tracking")
    env: EnvConfig = param(default_factory=EnvConfig, help="environment and observation")
    collect: CollectConfig = param(default_factory=CollectConfig, help="offline rollout collection")
    data: DataConfig = param(default_factory=DataConfig, help="reading the dataset for training")
