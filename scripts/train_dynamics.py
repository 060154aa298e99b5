#!/usr/bin/env python
"""Stage 3: train the action-conditioned dynamics model on the run's tokenised dataset.

    python scripts/train_dynamics.py [--env doorkey-6x6] [--preset tiny] [key=value ...]
    torchrun --nproc_per_node=2 scripts/train_dynamics.py --preset tiny run.name=x   # DDP, same result shape

Needs the collect and tokenizer stages in the same run folder (``<run>/dataset/``,
``<run>/tokenizer.pt``). Writes ``<run>/dynamics.pt``, resumes from ``<run>/dynamics.resume.pt``,
logs to ``<run>/tb/dynamics`` and ``<run>/media/dynamics_open_loop.gif`` (real | imagined).
``--help`` lists every config key.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import cli_config
from common.runs import RunDir, run_path
from common.stage import Stage, config_fields, guarded, run_stage, status
from scripts.stages import dataset_id, dynamics_id, main_for, tokenizer_id
from worldmodel.train_dynamics import CHECKPOINT_NAME, distributed_rank, setup_distributed, train

# Fields that change what is logged or how fast, not what is trained.
COSMETIC = ("dynamics.log_every", "dynamics.eval_every", "dynamics.eval_windows", "dynamics.video_every",
            "dynamics.video_length", "dynamics.video_count", "dynamics.checkpoint_every", "dynamics.encode_batch")


def identity(cfg) -> dict:
    return {
        "config": config_fields(cfg, ["dynamics"], exclude=COSMETIC)
        | {"data.val_fraction": float(cfg.data.val_fraction), "run.seed": int(cfg.run.seed)},
        "inputs": {"dataset": dataset_id(cfg), "tokenizer": tokenizer_id(cfg)},
    }


STAGE = Stage(
    name="dynamics",
    outputs=lambda cfg: [run_path(cfg) / CHECKPOINT_NAME],
    identity=identity,
    body=lambda cfg, run_dir: train(cfg, run_dir),
    sections=("env", "data", "dynamics"),
    content=dynamics_id,
)


def run(cfg, run_dir: RunDir) -> dict:
    """The stage contract: train unless ``dynamics.pt`` is complete and of this config and inputs."""
    return run_stage(STAGE, cfg, run_dir)


def main(argv: list[str] | None = None) -> dict:
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return main_for(STAGE, argv)
    # Under torchrun rank 0 decides (it checks the stage and holds the lock); the other ranks
    # train beside it when it runs, and write nothing.
    import torch.distributed as dist

    from scripts.config import Config, validate

    cfg = cli_config(Config, argv, validate=validate)
    setup_distributed(cfg.run.device)
    if distributed_rank() == 0:
        decision = [False]  # what the other ranks hear if the check fails
        try:
            with guarded():
                run_dir = RunDir(cfg, STAGE.name, argv).lock()
                decision = [status(STAGE, cfg, run_dir.path, STAGE.identity(cfg))[0] != "complete"]
        finally:
            dist.broadcast_object_list(decision, src=0)
        with guarded():
            return run_stage(STAGE, cfg, run_dir)
    decision = [None]
    dist.broadcast_object_list(decision, src=0)
    return train(cfg, None) if decision[0] else {}


if __name__ == "__main__":
    main()
