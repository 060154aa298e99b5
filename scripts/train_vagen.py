"""Train the VAGEN-style agent (state estimation, transition modelling, bi-level GAE).

    python scripts/train_vagen.py --preset tiny run.name=x
    python scripts/train_vagen.py --env doorkey6 vagen.strategy=NoThink run.name=nothink

Writes ``<run>/vagen.pt`` (loads with ``agents.policy.load_policy``), TensorBoard scalars under
``vagen/`` and the final real-env evaluation into ``metrics.json``. A run whose ``vagen.pt`` exists
is skipped; a killed run resumes from ``vagen.resume.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.train_vagen import train
from common.config import cli_config
from common.runs import RunDir
from scripts.config import Config, validate


def main(argv: list[str] | None = None) -> dict | None:
    cfg = cli_config(Config, argv, validate=validate)
    run = RunDir(cfg, "vagen", argv=None if argv is None else ["scripts/train_vagen.py", *argv])
    if (run / "vagen.pt").is_file():
        print(f"[vagen] {run / 'vagen.pt'} exists: nothing to do (delete it to retrain)")
        return None
    return train(cfg, run)


if __name__ == "__main__":
    main()
