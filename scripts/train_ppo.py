#!/usr/bin/env python
"""Stage: train the model-free PPO baseline on the real env (the yardstick at matched env steps).

    python scripts/train_ppo.py [--env doorkey-5x5] [--preset tiny] [key=value ...]
    torchrun --nproc_per_node=2 scripts/train_ppo.py --preset tiny run.name=x   # data-parallel, gloo on CPU

Needs a tokenizer (``<run>/tokenizer.pt``, or the one in ``ppo.tokenizer``'s run folder): the
policy reads the tokens of the real frame, as the Dreamer actor does. Writes ``<run>/ppo.pt`` (a
policy: ``agents.policy.load_policy``; evaluate it with ``evaluate.policies=...,<run>/ppo.pt``); a
killed run resumes from ``<run>/ppo.resume.pt``. ``--help`` lists every config key.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.train_ppo import FINAL_NAME, tokenizer_path, train
from common.runs import RunDir, run_path
from common.stage import Stage, checkpoint_content, config_fields, run_stage
from scripts.stages import TOKENIZER_HINT, distributed_main

# Fields that change what is logged or where the tokenizer is read from (its content is an input).
COSMETIC = ("ppo.log_every", "ppo.checkpoint_every", "ppo.tokenizer")


def ppo_id(cfg) -> str:
    return checkpoint_content(run_path(cfg) / FINAL_NAME, "ppo", "rerun scripts/train_ppo.py")


STAGE = Stage(
    name="ppo",
    outputs=lambda cfg: [run_path(cfg) / FINAL_NAME],
    identity=lambda cfg: {
        "config": config_fields(cfg, ["ppo", "env"], exclude=COSMETIC)
        | {"run.seed": int(cfg.run.seed), "evaluate.seed": int(cfg.evaluate.seed)},
        "inputs": {"tokenizer": checkpoint_content(tokenizer_path(cfg), "tokenizer", TOKENIZER_HINT)},
    },
    body=lambda cfg, run_dir: train(cfg, run_dir),
    sections=("env", "ppo"),
    content=ppo_id,
)


def run(cfg, run_dir: RunDir) -> dict:
    """The stage contract: train unless ``ppo.pt`` is complete and of this config and tokenizer."""
    return run_stage(STAGE, cfg, run_dir)


def main(argv: list[str] | None = None) -> dict:
    return distributed_main(STAGE, argv, train)


if __name__ == "__main__":
    main()
