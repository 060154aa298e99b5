#!/usr/bin/env python
"""Write a sandbox dataset folder as a Minari dataset (needs the extra: pip install -e '.[minari]').

    python scripts/export_minari.py --dataset runs/quickstart/dataset --out minari_datasets \\
        gridworld/doorkey-5x5-v0

Writes ``<out>/<dataset id>/data/{metadata.json, main_data.hdf5}``: ``<out>`` is a Minari datasets
root, so ``MINARI_DATASETS_PATH=<out> python -c "import minari; minari.load_dataset('<id>')"``
loads it, and ``data.path=<out>/<dataset id>`` trains a stage on it. Observations are
``{"image": RGB frame, "state": symbolic state}``; the metadata holds the whole dataset card.
A tool, not a pipeline stage: it reads no config and writes nothing in a run folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.atomic import ArtifactError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="export_minari.py",
        description="Write a sandbox dataset folder (shards + card.json) as a Minari dataset.")
    parser.add_argument("dataset_id", help="Minari dataset id, e.g. gridworld/doorkey-5x5-v0 "
                                           "((namespace/)name-v<version>)")
    parser.add_argument("--dataset", required=True, type=Path,
                        help="the sandbox dataset folder to export (e.g. runs/<run.name>/dataset)")
    parser.add_argument("--out", required=True, type=Path,
                        help="Minari datasets root to write into (what MINARI_DATASETS_PATH would name)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Export; on a dataset or id that cannot be used, the message on stderr and exit 1."""
    args = parse_args(argv)
    from envs import minari_io

    try:
        minari_io.import_minari()
        from minari.dataset.minari_dataset import parse_dataset_id

        parse_dataset_id(args.dataset_id)  # a malformed id fails before anything is read
        folder = minari_io.export(args.dataset, args.out, args.dataset_id)
        card = minari_io.read_card(folder)
    except (ArtifactError, ValueError) as error:
        print(f"export_minari: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote Minari dataset {args.dataset_id} to {folder}: {card['env_id']} ({card['obs']} view), "
          f"{card['episodes']} episodes, {card['steps']} steps, frames {tuple(card['frame_shape'])}")
    print(f"  load it: MINARI_DATASETS_PATH={args.out} python -c \"import minari; "
          f"minari.load_dataset('{args.dataset_id}')\"")
    print(f"  train on it: python scripts/train_tokenizer.py data.path={folder}")
    return folder


if __name__ == "__main__":
    main()
