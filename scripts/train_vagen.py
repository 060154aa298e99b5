#!/usr/bin/env python
"""Train the VAGEN-style agent (state estimation, transition modelling, bi-level GAE).

    python scripts/train_vagen.py --preset tiny run.name=x
    python scripts/train_vagen.py --env doorkey-6x6 vagen.strategy=NoThink run.name=nothink

Writes ``<run>/vagen.pt`` (loads with ``agents.policy.load_policy``), TensorBoard scalars under
``vagen/`` and the final real-env evaluation into ``metrics.json``. A complete ``vagen.pt`` of the
same config is skipped; a killed run resumes from ``vagen.resume.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.vagen.train import train
from common.runs import RunDir, run_path
from common.stage import Stage, checkpoint_content, config_fields, run_stage
from scripts.stages import main_for


def identity(cfg) -> dict:
    inputs = {}
    if str(cfg.vagen.world) != "real":  # trained in the dream: the world model is an input
        folder = Path(cfg.vagen.world_model) if cfg.vagen.world_model else run_path(cfg)
        inputs = {name: checkpoint_content(folder / f"{name}.pt", name, f"rerun scripts/train_{name}.py")
                  for name in ("tokenizer", "dynamics")}
    return {"config": config_fields(cfg, ["env", "vagen"], exclude=("vagen.log_every", "vagen.checkpoint_every"))
            | {"run.seed": int(cfg.run.seed)}, "inputs": inputs}


STAGE = Stage(
    name="vagen",
    outputs=lambda cfg: [run_path(cfg) / "vagen.pt"],
    identity=identity,
    body=train,
    sections=("env", "vagen"),
    content=lambda cfg: checkpoint_content(run_path(cfg) / "vagen.pt", "vagen", "rerun scripts/train_vagen.py"),
)


def run(cfg, run_dir: RunDir) -> dict:
    """The stage contract: train unless ``vagen.pt`` is complete and of this config."""
    return run_stage(STAGE, cfg, run_dir)


def main(argv: list[str] | None = None) -> dict:
    return main_for(STAGE, argv)


if __name__ == "__main__":
    main()
