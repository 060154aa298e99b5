#!/usr/bin/env python
"""Every way a run folder could be poisoned, tried on a tiny run: exit code, message, artifacts intact.

    python benchmarks/faults.py [--checkout PATH]

Builds one tiny quickstart run with ``PATH``'s scripts (default: this checkout; another clone gives
the figures of another commit), then per case copies it, breaks one thing (a bad value, a damaged
file, a second writer), runs the command as a user would and records its exit code, the first line
of what it said (the last line of a traceback) and whether every artifact that existed before is
byte-identical (logs aside), or at least still there under another name (an old artifact renamed
aside). Prints a Markdown table and one JSON object last.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

FAST = ["--preset", "tiny", "dynamics.steps=30", "dynamics.checkpoint_every=15"]
LOGS = ("commands.log", "tb", ".lock")


def snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] not in LOGS:
            out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def is_artifact(name: str) -> bool:
    """A stage's result (not a record about it: config, metrics, manifests, media are rewritten)."""
    return name.endswith(".pt") or name.startswith("dataset") or name.startswith("report")


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * 0.6)
    data[start:start + 64] = os.urandom(64)
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def said(result: subprocess.CompletedProcess) -> str:
    err = [line for line in result.stderr.splitlines() if line.strip() and "Warning" not in line
           and not line.startswith(" ")]
    if "Traceback" in result.stderr:
        return err[-1][:160] if err else ""
    if err:
        return err[0][:160]
    out = [line for line in result.stdout.splitlines() if line.strip()]
    return out[-1][:160] if out else ""


def cases(run: Path) -> list[tuple[str, str, list[str], object]]:
    """(case, script, extra arguments, damage applied to the copied run folder or None)."""
    d = run
    out = [
        ("1 collect.num_episodes=0", "collect", ["collect.num_episodes=0"], None),
        ("1 collect.episodes_per_shard=0", "collect", ["collect.episodes_per_shard=0"], None),
        ("1 collect.policy_mix=epsilon_oracle@1.5:1", "collect", ["collect.policy_mix=epsilon_oracle@1.5:1"], None),
        ("1 tokenizer.batch_size=0", "train_tokenizer", ["tokenizer.batch_size=0"], None),
        ("2 dynamics.steps=-1", "train_dynamics", ["dynamics.steps=-1"], None),
        ("2 dynamics.steps=0", "train_dynamics", ["dynamics.steps=0"], None),
        ("2 tokenizer.steps=0", "train_tokenizer", ["tokenizer.steps=0"], None),
        ("2 dreamer.updates=0", "train_dreamer", ["dreamer.updates=0"], None),
        ("2 dreamer.batch_size=0", "train_dreamer", ["dreamer.batch_size=0"], None),
        ("2 dreamer.horizon=0", "train_dreamer", ["dreamer.horizon=0"], None),
        ("2 tokenizer.log_every=0", "train_tokenizer", ["tokenizer.log_every=0"], None),
        ("2 evaluate.episodes=0", "evaluate", ["evaluate.episodes=0"], None),
        ("3 dynamics.lr=1e6", "train_dynamics", ["dynamics.lr=1e6"], None),
        ("3 tokenizer.learning_rate=1e9", "train_tokenizer", ["tokenizer.learning_rate=1e9"], None),
        ("4 tokenizer rerun on a quickstart run", "train_tokenizer", [], None),
        ("5 random bytes in dynamics.pt -> train_dreamer", "train_dreamer", ["dreamer.updates=30"],
         lambda: flip(d / "dynamics.pt")),
        ("5 random bytes in dynamics.pt -> evaluate", "evaluate", [], lambda: flip(d / "dynamics.pt")),
        ("5 random bytes in dreamer.pt -> evaluate", "evaluate", [], lambda: flip(d / "dreamer.pt")),
        ("5 random bytes in dreamer.pt -> train_dreamer", "train_dreamer", [], lambda: flip(d / "dreamer.pt")),
        ("6 truncated shard -> collect", "collect", [], lambda: truncate(d / "dataset" / "shard_00001.npz")),
        ("6 no shards -> collect", "collect", [], lambda: [p.unlink() for p in (d / "dataset").glob("shard_*.npz")]),
        ("7 corrupt shard -> train_tokenizer", "train_tokenizer", ["tokenizer.steps=50"],
         lambda: flip(d / "dataset" / "shard_00000.npz")),
        ("7 corrupt card.json -> train_dynamics", "train_dynamics", ["dynamics.steps=31"],
         lambda: (d / "dataset" / "card.json").write_text("{not json")),
        ("7 truncated dreamer.pt -> evaluate", "evaluate", [], lambda: truncate(d / "dreamer.pt")),
        ("7 truncated tokenizer.pt -> train_tokenizer", "train_tokenizer", [], lambda: truncate(d / "tokenizer.pt")),
        ("7 a .json as a policy", "evaluate", [f"evaluate.policies=random,oracle,{d / 'metrics.json'}"], None),
        ("8 5x5 dataset, --env doorkey-6x6", "train_tokenizer",
         ["run.name=six", f"data.path={d / 'dataset'}", "--env", "doorkey-6x6"], None),
        ("9 quickstart dreamer.hidden_dim=64 dynamics.dim=64", "quickstart", ["dreamer.hidden_dim=64", "dynamics.dim=64"],
         None),
        ("11 stale temp file, then train_dreamer", "train_dreamer", ["dreamer.updates=25"],
         lambda: (d / ".dreamer.resume.pt.abc123.tmp").write_bytes(b"half")),
        ("14 run.name=../../x", "collect", ["run.name=../../x"], None),
        ("14 300-character run.name", "collect", ["run.name=" + "x" * 300], None),
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=_common.ROOT)
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    scratch = Path(tempfile.mkdtemp(prefix="bench_faults_"))
    python = sys.executable
    env = {**os.environ, "PYTHONPATH": str(checkout)}

    def script(name: str, root: Path, extra: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([python, f"scripts/{name}.py", *FAST, f"run.root={root}", "run.name=quickstart", *extra],
                              cwd=checkout, env=env, capture_output=True, text=True, timeout=600)

    print(f"[bench] building the tiny run with {checkout}", file=sys.stderr, flush=True)
    built = script("quickstart", scratch / "built", [])
    if built.returncode != 0:
        raise SystemExit(built.stderr[-2000:])
    rows = []
    try:
        for index, (case, name, extra, damage) in enumerate(cases(scratch / "case" / "quickstart")):
            root = scratch / "case"
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(scratch / "built", root)
            run = root / "quickstart"
            if damage is not None:
                damage()
            before = snapshot(run)
            started = time.perf_counter()
            result = script(name, root, extra)
            after = snapshot(run)
            row = {"case": case, "command": f"scripts/{name}.py {' '.join(extra)}"[:120], "exit": result.returncode,
                   "said": said(result), "intact": after == before,
                   # every artifact file (checkpoint, shard, report) is still there, in place or renamed aside
                   "nothing_lost": {v for k, v in before.items() if is_artifact(k)} <= set(after.values()),
                   "seconds": round(time.perf_counter() - started, 1)}
            if name == "quickstart":
                row["stages_run"] = [line.split("]")[0][1:] for line in result.stdout.splitlines()
                                     if line.startswith("[") and "] done" in line]
            if case.startswith("11"):
                row["temp_left"] = (run / ".dreamer.resume.pt.abc123.tmp").exists()
            rows.append(row)
            print(f"[bench] {index + 1}: {case}: exit {row['exit']}, intact {row['intact']}: {row['said']}",
                  file=sys.stderr, flush=True)
        modes = {name: oct((scratch / "built" / "quickstart" / name).stat().st_mode & 0o777)
                 for name in ("dynamics.pt", "config.yaml")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("| case | exit | first line | artifacts intact | nothing lost |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['exit']} | {row['said'].replace('|', '/')} | {'yes' if row['intact'] else 'no'} "
              f"| {'yes' if row['nothing_lost'] else 'no'} |")
    _common.finish("faults", {"checkout": str(checkout), "cases": rows, "file_modes": modes,
                              "machine": _common.machine()})


if __name__ == "__main__":
    main()
