#!/usr/bin/env python
"""Stage: train the inverse dynamics model, (frame, next frame) -> the actions consistent with the change.

    python scripts/train_inverse.py [--env doorkey-6x6] [--preset tiny] [key=value ...]
    torchrun --nproc_per_node=2 scripts/train_inverse.py --preset tiny run.name=x   # DDP, same result shape

Needs a dataset (``<run>/dataset/`` or ``data.path``): the model reads its frames, and the exact
targets come from its symbolic states (no tokenizer). Writes
``<run>/inverse.pt`` (``worldmodel.inverse.load_inverse``) and its validation metrics
(``accuracy_identifiable``, ``noop_set_exact``) into ``metrics.json``. ``--help`` lists every config key.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.runs import RunDir, run_path
from common.stage import Stage, config_fields, run_stage
from scripts.stages import dataset_id, distributed_main, inverse_id
from worldmodel.train_inverse import CHECKPOINT_NAME, train

COSMETIC = ("inverse.log_every",)


STAGE = Stage(
    name="inverse",
    outputs=lambda cfg: [run_path(cfg) / CHECKPOINT_NAME],
    identity=lambda cfg: {
        "config": config_fields(cfg, ["inverse"], exclude=COSMETIC)
        | {"data.val_fraction": float(cfg.data.val_fraction), "data.labelled_fraction": float(cfg.data.labelled_fraction),
           "run.seed": int(cfg.run.seed)},
        "inputs": {"dataset": dataset_id(cfg)},
    },
    body=lambda cfg, run_dir: train(cfg, run_dir),
    sections=("env", "data", "inverse"),
    content=inverse_id,
)


def run(cfg, run_dir: RunDir) -> dict:
    """The stage contract: train unless ``inverse.pt`` is complete and of this config and inputs."""
    return run_stage(STAGE, cfg, run_dir)


def main(argv: list[str] | None = None) -> dict:
    return distributed_main(STAGE, argv, train)


if __name__ == "__main__":
    main()
