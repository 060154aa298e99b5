"""What the stages' identities are made of: the content identities of their inputs, and the one
command-line entry every stage script uses (:func:`main_for`). The mechanism is
:mod:`common.stage`; each ``scripts/<stage>.py`` declares its :class:`common.stage.Stage`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from common.config import ConfigError, cli_config
from common.runs import RunDir, run_path
from common.stage import Stage, checkpoint_content, stage_main

TOKENIZER_HINT = "rerun scripts/train_tokenizer.py"
DYNAMICS_HINT = "rerun scripts/train_dynamics.py"
DREAMER_HINT = "rerun scripts/train_dreamer.py"


def dataset_id(cfg: Any) -> str:
    """The training dataset's content identity; its env and view must be the config's (``data.mix``:
    every dataset's, of the config's view)."""
    from envs.dataset import dataset_content, training_folder, training_folders

    if cfg.data.mix:
        return "+".join(dataset_content(folder, cfg.env, any_env=True) for folder in training_folders(cfg))
    return dataset_content(training_folder(cfg), cfg.env)


def tokenizer_id(cfg: Any) -> str:
    return checkpoint_content(run_path(cfg) / "tokenizer.pt", "tokenizer", TOKENIZER_HINT)


def dynamics_id(cfg: Any) -> str:
    return checkpoint_content(run_path(cfg) / "dynamics.pt", "dynamics", DYNAMICS_HINT)


def inverse_id(cfg: Any) -> str:
    return checkpoint_content(run_path(cfg) / "inverse.pt", "inverse dynamics", "run scripts/train_inverse.py")


def _agent_id(cfg: Any, trainer: Any, what: str, hint: str) -> str:
    """The content identity of an agent's final policy and of every policy saved along its training
    (``trainer``: the training module, with ``FINAL_NAME`` and ``checkpoints_along_training``)."""
    folder = run_path(cfg)
    paths = [folder / trainer.FINAL_NAME, *trainer.checkpoints_along_training(folder)]
    return ",".join(checkpoint_content(path, what, hint) for path in paths)


def dreamer_id(cfg: Any) -> str:
    """The final agent and every policy saved along its training."""
    from agents import train_dreamer

    return _agent_id(cfg, train_dreamer, "dreamer", DREAMER_HINT)


def ppo_id(cfg: Any) -> str:
    """The PPO baseline and every policy saved along its training."""
    from agents import train_ppo

    return _agent_id(cfg, train_ppo, "ppo", "rerun scripts/train_ppo.py")


def policy_ids(cfg: Any) -> dict[str, str]:
    """The content identity of every saved policy that ``evaluate.policies`` names (scripted
    policies have none: their code is their identity), and of every outside policy (a
    ``module:attr``: its module's source file; a TorchScript or stable-baselines3 file: its bytes),
    which is also built once here, so a bad one fails before anything is written. A name that is
    none of these fails, naming the key."""
    from agents.outside import is_outside, outside_identity
    from agents.policy import make_policy

    ids: dict[str, str] = {}
    for item in (part.strip() for part in str(cfg.evaluate.policies).split(",")):
        if not item:
            continue
        if is_outside(item):
            try:
                make_policy(item, env_id=str(cfg.env.id))
                ids[item] = outside_identity(item)
            except ValueError as error:
                raise ConfigError(f"evaluate.policies: {error}") from None
        elif item in ("dreamer", "checkpoints"):
            ids["dreamer"] = dreamer_id(cfg)
        elif item == "vagen":
            ids["vagen"] = checkpoint_content(run_path(cfg) / "vagen.pt", "vagen", "rerun scripts/train_vagen.py")
        elif item in ("ppo", "ppo_checkpoints"):
            ids["ppo"] = ppo_id(cfg)
        elif is_path(item):
            if not Path(item).is_file():
                raise ConfigError(f"evaluate.policies: policy file {item} not found")
            ids[item] = checkpoint_content(Path(item), "policy", "give a checkpoint written by agents.policy.save_policy")
        else:
            try:
                make_policy(item, env_id=str(cfg.env.id))
            except ValueError as error:
                raise ConfigError(f"evaluate.policies: {error}") from None
    return ids


def is_path(item: str) -> bool:
    """A policy named by its file (``agent.pt``, ``out/policy.json``), not a scripted policy
    (``epsilon_oracle@0.75``, whose ``.75`` is no file suffix)."""
    return "/" in item or (Path(item).suffix != "" and "@" not in item)


def main_for(stage: Stage, argv: Sequence[str] | None, after: Callable[[Any, Any], None] | None = None) -> Any:
    """A stage script's ``main``: validate (exit 2), lock the run folder, run the contract (exit 1
    with the message on a file that cannot be trusted or a diverged loss); ``after(cfg, metrics)``
    prints what the stage made."""
    from scripts.config import Config, validate

    return stage_main(stage, lambda: cli_config(Config, argv, validate=validate),
                      lambda cfg: RunDir(cfg, stage.name, argv), after=after)


def distributed_main(stage: Stage, argv: Sequence[str] | None, train: Callable[[Any, Any], Any]) -> Any:
    """``main`` of a stage whose loop runs under ``torchrun``: one process is :func:`main_for`;
    under torchrun rank 0 decides (it checks the stage and holds the lock) and the other ranks run
    ``train(cfg, None)`` beside it when it trains, writing nothing."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return main_for(stage, argv)
    import torch.distributed as dist

    from common.stage import guarded, run_stage, status
    from scripts.config import Config, validate
    from worldmodel.train_dynamics import distributed_rank, setup_distributed

    cfg = cli_config(Config, argv, validate=validate)
    setup_distributed(cfg.run.device)
    if distributed_rank() == 0:
        decision = [False]  # what the other ranks hear if the check fails
        try:
            with guarded():
                run_dir = RunDir(cfg, stage.name, argv).lock()
                decision = [status(stage, cfg, run_dir.path, stage.identity(cfg))[0] != "complete"]
        finally:
            dist.broadcast_object_list(decision, src=0)
        with guarded():
            return run_stage(stage, cfg, run_dir)
    decision = [None]
    dist.broadcast_object_list(decision, src=0)
    return train(cfg, None) if decision[0] else {}
