#!/usr/bin/env python
"""Training speed per stage at 1 and 2 torch threads, on an idle machine and beside one busy process.

    python benchmarks/threads.py [--threads 1 2]

Prepares one small quickstart run folder (DoorKey-5x5), then for each stage (tokenizer, dynamics,
dreamer), thread count and load reruns that stage alone with the quickstart's model sizes through
its own script (``run.threads=T``) and reads the stage's steps and ``train_seconds`` from
``metrics.json``. "busy" is one single-threaded Python spin loop started beside it. Prints progress
and one JSON object last: ``{stage: {"threads_T": {"idle": steps/s, "busy": steps/s}}}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

ROOT = Path(__file__).resolve().parent.parent
PREPARE = ["collect.num_steps=3000", "tokenizer.steps=300", "dynamics.steps=100", "dreamer.updates=20",
           "evaluate.episodes=2", "run.progress=false", "run.threads=1"]
# What each stage reruns, its outputs, and the metrics.json keys of (steps, seconds).
STAGES = {
    "tokenizer": (["tokenizer.steps=300", "tokenizer.stop_when_exact=false"], ["tokenizer.pt"], ("steps", "train_seconds")),
    "dynamics": (["dynamics.steps=80", "dynamics.eval_every=0", "dynamics.video_every=0"], ["dynamics.pt"],
                 ("train_steps", "train_seconds")),
    "dreamer": (["dreamer.updates=40", "dreamer.checkpoint_every=1000"], ["dreamer.pt", "dreamer_checkpoints"],
                ("updates", "train_seconds")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench_threads_"))
    python = sys.executable
    base = ["scripts/quickstart.py", f"run.root={scratch}", "run.name=base", *PREPARE]
    print("[bench] preparing the run folder", file=sys.stderr, flush=True)
    subprocess.run([python, *base], cwd=ROOT, check=True, capture_output=True)
    result: dict = {"machine": _common.machine(), "env_id": "MiniGrid-DoorKey-5x5-v0"}
    try:
        for stage, (overrides, outputs, (steps_key, seconds_key)) in STAGES.items():
            result[stage] = {}
            for threads in args.threads:
                rates = {}
                for load in ("idle", "busy"):
                    name = f"{stage}_{threads}_{load}"
                    shutil.copytree(scratch / "base", scratch / name)
                    for output in outputs:
                        target = scratch / name / output
                        shutil.rmtree(target) if target.is_dir() else target.unlink()
                    (scratch / name / "stages" / f"{stage}.json").unlink()
                    busy = subprocess.Popen([python, "-c", "while True: pass"]) if load == "busy" else None
                    try:
                        script = "train_" + stage
                        subprocess.run([python, f"scripts/{script}.py", f"run.root={scratch}", f"run.name={name}",
                                        f"run.threads={threads}", "run.progress=false", *overrides],
                                       cwd=ROOT, check=True, capture_output=True)
                    finally:
                        if busy is not None:
                            busy.kill()
                            busy.wait()
                    metrics = json.loads((scratch / name / "metrics.json").read_text())[stage]
                    rates[load] = round(float(metrics[steps_key]) / float(metrics[seconds_key]), 2)
                    print(f"[bench] {stage} threads {threads} {load}: {rates[load]} steps/s", file=sys.stderr, flush=True)
                    time.sleep(1)
                result[stage][f"threads_{threads}"] = rates
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _common.finish("threads", result)


if __name__ == "__main__":
    main()
