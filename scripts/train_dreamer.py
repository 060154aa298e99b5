#!/usr/bin/env python
"""Stage: train the Dreamer-style agent in the run's world model (imagination only).

    python scripts/train_dreamer.py [--env doorkey-6x6] [--preset tiny] [key=value ...]

Needs ``<run>/tokenizer.pt``, ``<run>/dynamics.pt`` and the dataset. Writes ``<run>/dreamer.pt``
(a policy: ``agents.policy.load_policy``) and ``<run>/dreamer_checkpoints/``; a killed run resumes
from ``<run>/dreamer.resume.pt``. ``--help`` lists every config key.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.train_dreamer import CHECKPOINT_FOLDER, FINAL_NAME, train
from common.runs import RunDir, run_path
from common.stage import Stage, config_fields, run_stage
from scripts.stages import dataset_id, dreamer_id, dynamics_id, main_for, tokenizer_id

STAGE = Stage(
    name="dreamer",
    outputs=lambda cfg: [run_path(cfg) / FINAL_NAME, run_path(cfg) / CHECKPOINT_FOLDER],
    identity=lambda cfg: {
        "config": config_fields(cfg, ["dreamer"], exclude=("dreamer.log_every",))
        | {"env.id": str(cfg.env.id), "run.seed": int(cfg.run.seed)},
        "inputs": {"dataset": dataset_id(cfg), "tokenizer": tokenizer_id(cfg), "dynamics": dynamics_id(cfg)},
    },
    body=train,
    sections=("env", "dreamer"),
    content=dreamer_id,
    resumable=True,  # the agent resumes from dreamer.resume.pt, keeping the checkpoints saved before it
)


def run(cfg, run_dir: RunDir) -> dict:
    """The stage contract: train unless ``dreamer.pt`` is complete and of this config and world model."""
    return run_stage(STAGE, cfg, run_dir)


def main(argv: list[str] | None = None) -> dict:
    return main_for(STAGE, argv)


if __name__ == "__main__":
    main()
