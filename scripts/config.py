"""The root config: one section per stage, shared by every script, so a run folder's
``config.yaml`` describes every stage that ran in it. Each section's dataclass lives beside the code
it configures."""

from __future__ import annotations

from dataclasses import dataclass

from agents.dreamer import DreamerConfig
from agents.evaluate import EvaluateConfig
from agents.ppo import PPOConfig
from agents.vagen.train import VagenConfig
from common.config import RunConfig, param
from envs.collect import CollectConfig
from envs.dataset import DataConfig
from envs.make import EnvConfig
from worldmodel.train_dynamics import DynamicsConfig
from worldmodel.train_inverse import InverseStageConfig
from worldmodel.train_tokenizer import TokenizerStageConfig


@dataclass
class QuickstartConfig:
    """Which stages scripts/quickstart.py chains."""

    vagen: bool = param(False, "also train the VAGEN agent (scripts/train_vagen.py) and evaluate it beside the others")


@dataclass
class Config:
    """Everything a run needs."""

    run: RunConfig = param(default_factory=RunConfig, help="run folder, seed, device, tracking")
    env: EnvConfig = param(default_factory=EnvConfig, help="environment and observation")
    collect: CollectConfig = param(default_factory=CollectConfig, help="offline rollout collection")
    data: DataConfig = param(default_factory=DataConfig, help="reading the dataset for training")
    tokenizer: TokenizerStageConfig = param(default_factory=TokenizerStageConfig, help="frame tokenizer: frames <-> one token per tile")
    dynamics: DynamicsConfig = param(default_factory=DynamicsConfig, help="action-conditioned dynamics model (world model)")
    inverse: InverseStageConfig = param(default_factory=InverseStageConfig, help="inverse dynamics: (frame, next frame) -> actions")
    dreamer: DreamerConfig = param(default_factory=DreamerConfig, help="Dreamer-style agent trained in imagination")
    ppo: PPOConfig = param(default_factory=PPOConfig, help="model-free PPO baseline on the real env")
    evaluate: EvaluateConfig = param(default_factory=EvaluateConfig, help="policies in the real env vs in the dream")
    vagen: VagenConfig = param(default_factory=VagenConfig, help="VAGEN-style agent: state estimation, transition modelling")
    quickstart: QuickstartConfig = param(default_factory=QuickstartConfig, help="the stages the quickstart chains")


def validate(cfg) -> None:
    """The checks each field's bounds and choices cannot express (``cli_config`` runs those first):
    values against registries and parsers, and fields against each other. Each error names its key."""
    from agents.ppo import check_config as check_ppo
    from agents.vagen.train import check_config as check_vagen
    from agents.vagen.train import check_view
    from envs.make import normalize_env_id
    from envs.policies import parse_policy_mix
    from worldmodel.train_tokenizer import model_config as tokenizer_model_config

    try:
        normalize_env_id(cfg.env.id)
    except ValueError as error:
        raise ValueError(f"env.id: {error}") from None
    try:
        parse_policy_mix(cfg.collect.policy_mix)
    except ValueError as error:
        raise ValueError(f"collect.policy_mix: {error}") from None
    if cfg.tokenizer.quantizer == "fsq" and len(cfg.tokenizer.fsq_levels) == 0:
        raise ValueError("tokenizer.fsq_levels: fsq needs at least one latent channel, got []")
    tokenizer_model_config(cfg.tokenizer, cfg.env.tile_size)  # the tokenizer's own checks, before any work
    if cfg.dynamics.dim % cfg.dynamics.heads:
        raise ValueError(f"dynamics.dim: must be a multiple of dynamics.heads ({cfg.dynamics.heads}), got {cfg.dynamics.dim}")
    evaluated = {item.strip() for item in str(cfg.evaluate.policies).split(",")}
    for required in ("random", "oracle"):
        if required not in evaluated:
            raise ValueError(f"evaluate.policies: must include '{required}' (the normalised score is relative to it), "
                             f"got '{cfg.evaluate.policies}'")
    if cfg.data.labelled_fraction == 0 and cfg.dynamics.unlabelled != "hidden":
        raise ValueError(f"dynamics.unlabelled: '{cfg.dynamics.unlabelled}' needs labelled episodes, and "
                         "data.labelled_fraction is 0 (use hidden for action-free pretraining)")
    if cfg.data.mix and cfg.env.obs != "full":
        raise ValueError("data.mix: one model for many envs is built for the full view (env.obs=full); "
                         f"got env.obs={cfg.env.obs}")
    if cfg.data.mix and cfg.dynamics.memory == "map":
        raise ValueError("dynamics.memory: map is the egocentric view's memory; data.mix trains full-view models")
    check_vagen(cfg.vagen)
    if cfg.quickstart.vagen:
        check_view(cfg)
    check_ppo(cfg.ppo)
