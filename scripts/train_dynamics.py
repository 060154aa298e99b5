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

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.runs import RunDir, run_path
from common.stage import Stage, checkpoint_content, config_fields, run_stage
from scripts.stages import dataset_id, distributed_main, dynamics_id, inverse_id, tokenizer_id
from worldmodel.train_dynamics import CHECKPOINT_NAME, train

# Fields that change what is logged or how fast, not what is trained.
COSMETIC = ("dynamics.init", "dynamics.log_every", "dynamics.eval_every", "dynamics.eval_windows", "dynamics.video_every",
            "dynamics.video_length", "dynamics.video_count", "dynamics.checkpoint_every", "dynamics.encode_batch")


def identity(cfg) -> dict:
    inputs = {"dataset": dataset_id(cfg), "tokenizer": tokenizer_id(cfg)}
    if cfg.dynamics.init:  # the starting weights are an input, by content
        inputs["init"] = checkpoint_content(Path(cfg.dynamics.init), "dynamics", "dynamics.init: give a dynamics.pt")
    if cfg.data.labelled_fraction < 1 and cfg.dynamics.unlabelled == "inverse":
        inputs["inverse"] = inverse_id(cfg)
    return {
        "config": config_fields(cfg, ["dynamics"], exclude=COSMETIC)
        | {"data.val_fraction": float(cfg.data.val_fraction), "data.labelled_fraction": float(cfg.data.labelled_fraction),
           "run.seed": int(cfg.run.seed)},
        "inputs": inputs,
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
    return distributed_main(STAGE, argv, train)


if __name__ == "__main__":
    main()
