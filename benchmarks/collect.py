#!/usr/bin/env python
"""Collection speed (full and partial view, sync and async vector envs) and window-sampling rate.

    python benchmarks/collect.py [--steps 6000]

Prints progress and one JSON object last with ``collect_steps_per_second`` per view and vector-env
kind, ``window_samples_per_second`` (windows of 16 frames, batch 64) and the frame rate it implies.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
import numpy as np
from omegaconf import OmegaConf

from envs.collect import CollectConfig, collect
from envs.dataset import EpisodeDataset
from envs.make import EnvConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--env", default="MiniGrid-DoorKey-6x6-v0")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench_collect_"))
    result: dict = {"env_id": args.env, "steps": args.steps, "machine": _common.machine()}
    try:
        for obs in ("full", "partial"):
            for async_envs in (False, True):
                env = OmegaConf.structured(EnvConfig(id=args.env, obs=obs))
                settings = OmegaConf.structured(CollectConfig(
                    num_steps=args.steps, num_envs=8 if not async_envs else 2, async_envs=async_envs,
                    policy_mix="random:0.5,epsilon_oracle@0.3:0.5", episodes_per_shard=32,
                ))
                folder = scratch / f"{obs}_{async_envs}"
                start = time.perf_counter()
                card = collect(env, settings, folder, progress=False)
                rate = card["steps"] / (time.perf_counter() - start)
                key = f"collect_steps_per_second_{obs}" + ("_async2" if async_envs else "_sync8")
                result[key] = round(rate, 1)
                print(f"{key}: {rate:.0f} steps/s ({card['steps']} steps)", file=sys.stderr, flush=True)
        data = EpisodeDataset.load(scratch / "full_False")
        rng = np.random.default_rng(0)
        data.sample_windows(rng, 64, 16)
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < 3.0:
            data.sample_windows(rng, 64, 16)
            count += 1
        seconds = time.perf_counter() - start
        result["window_batches_per_second"] = round(count / seconds, 1)
        result["window_samples_per_second"] = round(64 * count / seconds, 1)
        result["window_frames_per_second"] = round(64 * 16 * count / seconds, 1)
        print(f"window sampling: {count / seconds:.0f} batches/s of 64x16 frames", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _common.finish("collect", result)


if __name__ == "__main__":
    main()
