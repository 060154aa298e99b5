"""Benchmark of the VAGEN-style agent: strategies x envs x seeds, trained from scratch.

    python benchmarks/vagen.py                      # the full table (DoorKey-5x5 and -6x6, 3 seeds)
    python benchmarks/vagen.py --steps 4096 --envs MiniGrid-DoorKey-5x5-v0 --seeds 0   # a quick look

Every strategy gets the same number of real env steps (``--steps``) and the same evaluation
episodes (fixed env seeds). Writes ``benchmarks/results/vagen.md`` (the table, with per-seed values,
machine load and budget) and ``benchmarks/results/vagen.json``, and prints that JSON object last::

    {env_id: {view: {strategy: {"normalized_score", "normalized_score_ci", "steps_to_0.9", "return_ratio",
                                "state_accuracy", "prediction_accuracy", "format_rate",
                                "per_seed": {metric: [...]}, "std": {metric: ...}}}}}

``steps_to_0.9``: the real training steps at the first evaluation (every ``--eval-every`` updates,
``--eval-episodes`` episodes, evaluation steps not counted) whose score reaches 0.9 and stays there
at the next one; its mean is null unless every seed got there. Metric values are means over seeds; ``null`` where a strategy has no such part (NoThink has no
state estimate). ``normalized_score`` is ``(R - R_random) / (R_oracle - R_random)`` of the mean real
return, as in ``agents/evaluate.py``, with the random and BFS-oracle policies' returns on the same env
seeds; ``return_ratio`` is the mean over episodes of the return over the BFS oracle's optimal return.
Runs go to ``--root``; a run that an earlier invocation finished with the same job (the same env and
vagen config, today's defaults included, seed and evaluation episodes) is reused, anything else there
is deleted and trained from scratch (``--fresh`` retrains everything).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.atomic import atomic_write_json, atomic_write_text  # noqa: E402

STRATEGY_RUNS = {  # benchmark name -> (vagen.strategy, vagen.advantage)
    "NoThink": ("NoThink", "bilevel"),
    "FreeThink": ("FreeThink", "bilevel"),
    "StateEstimation": ("StateEstimation", "bilevel"),
    "TransitionModeling": ("TransitionModeling", "bilevel"),
    "WorldModeling": ("WorldModeling", "bilevel"),
    "WorldModeling-TurnGAE": ("WorldModeling", "turn"),
}
METRICS = ("normalized_score", "return_ratio", "state_accuracy", "prediction_accuracy", "format_rate")
RESULTS = Path(__file__).resolve().parent / "results"
# The table's view level: the agent reads full-grid frames only (its tiles are the grid's cells); the
# egocentric column needs a network that reads the 7x7 view.
VIEW = "full"


def run_one(job: dict) -> dict:
    """Train one (env, strategy, seed) from scratch in its own process; return its evaluation."""
    import torch

    torch.set_num_threads(1)
    from agents.vagen.train import train
    from common.runs import RunDir

    folder = Path(job["root"]) / job["name"]
    argv, cfg = job_config(job)
    finished = _finished_metrics(folder, job, cfg)
    if finished is not None:  # the same run, already trained from scratch by an earlier invocation
        print(f"[bench] {job['env_id']} {job['label']} seed {job['seed']}: reusing {folder}", file=sys.stderr, flush=True)
        return {**job, "metrics": finished}
    if folder.exists():
        shutil.rmtree(folder)  # a partial or different run: start from scratch
    started = time.time()
    metrics = train(cfg, RunDir(cfg, "vagen", argv=["benchmarks/vagen.py", *argv]))
    metrics["wall_seconds"] = time.time() - started
    print(
        f"[bench] {job['env_id']} {job['label']} seed {job['seed']}: score {metrics['normalized_score']:.3f} "
        f"return ratio {metrics['return_ratio']:.3f} "
        f"state {metrics['state_accuracy']:.3f} pred {metrics['prediction_accuracy']:.3f} format {metrics['format_rate']:.3f} "
        f"({metrics['wall_seconds']:.0f} s)",
        file=sys.stderr, flush=True,
    )
    return {**job, "metrics": metrics}


def job_config(job: dict):
    """The command-line overrides and the full config of one benchmark run."""
    from omegaconf import OmegaConf

    from scripts.config import Config

    argv = [
        f"run.name={job['name']}", f"run.root={job['root']}", f"run.seed={job['seed']}", "run.threads=1",
        "run.progress=false", f"env.id={job['env_id']}", f"vagen.strategy={job['strategy']}",
        f"vagen.advantage={job['advantage']}", f"vagen.total_env_steps={job['steps']}",
        f"vagen.eval_episodes={job['eval_episodes']}", f"vagen.eval_every={job['eval_every']}", f"env.obs={job['view']}",
        *job["overrides"],
    ]
    # The dataclass defaults, then this job's values: no preset or env file is read, so one being
    # mid-edit by someone else cannot fail a 40-minute run.
    return argv, OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(argv))


def _finished_metrics(folder: Path, job: dict, cfg) -> dict | None:
    """The metrics of a finished run in ``folder`` made by exactly this job under today's
    defaults (its saved env and vagen config equal this job's), else None."""
    import yaml
    from omegaconf import OmegaConf

    if job["fresh"] or not (folder / "vagen.pt").is_file() or not (folder / "metrics.json").is_file():
        return None
    metrics = json.loads((folder / "metrics.json").read_text()).get("vagen", {})
    if "return_ratio" not in metrics:  # evaluated before the rename: its normalized_score is R / R_opt
        return None
    config = yaml.safe_load((folder / "config.yaml").read_text())
    wanted = OmegaConf.to_container(cfg, resolve=True)
    same = (
        config["run"]["seed"] == job["seed"] and all(config.get(section) == wanted[section] for section in ("env", "vagen"))
    )
    if not same:
        return None
    metrics.setdefault("wall_seconds", metrics.get("train_seconds", float("nan")))
    return {k: (float("nan") if v is None else v) for k, v in metrics.items()}


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)


def steps_to(curve: list[list[float]], threshold: float = 0.9) -> float | None:
    """Real training steps at the first evaluation of ``curve`` ([steps, score], in order) whose score
    reaches ``threshold`` and stays there at the next evaluation (the last one counts alone); None if none."""
    for i, (steps, score) in enumerate(curve):
        if score >= threshold and (i + 1 == len(curve) or curve[i + 1][1] >= threshold):
            return steps
    return None


def summarise(results: list[dict], envs: list[str], labels: list[str], view: str) -> dict:
    """{env_id: {view: {label: entry}}}: per metric the mean over seeds, its std and the seeds' values;
    ``normalized_score_ci`` a 95% normal interval of the mean; ``steps_to_0.9`` per seed and its mean
    over the seeds that got there."""
    table: dict = {}
    for env_id in envs:
        table[env_id] = {view: {}}
        for label in labels:
            rows = [r["metrics"] for r in results if r["env_id"] == env_id and r["label"] == label]
            entry: dict = {"per_seed": {}, "std": {}}
            for metric in METRICS:
                values = [float(m[metric]) for m in rows]
                finite = [v for v in values if not math.isnan(v)]
                entry[metric] = _clean(sum(finite) / len(finite)) if finite else None
                entry["std"][metric] = _clean(float(_std(finite))) if finite else None
                entry["per_seed"][metric] = [_clean(v) for v in values]
            scores = [v for v in entry["per_seed"]["normalized_score"] if v is not None]
            half = 1.96 * _std(scores) / math.sqrt(len(scores)) if scores else float("nan")
            entry["normalized_score_ci"] = [_clean(entry["normalized_score"] - half), _clean(entry["normalized_score"] + half)] if scores else None
            reached = [steps_to(m.get("curve", [])) for m in rows]
            entry["per_seed"]["steps_to_0.9"] = reached
            got = [v for v in reached if v is not None]
            entry["steps_to_0.9"] = _clean(sum(got) / len(got)) if got and len(got) == len(reached) else None
            entry["std"]["steps_to_0.9"] = _clean(_std(got)) if got and len(got) == len(reached) else None
            entry["seeds"] = [r["seed"] for r in results if r["env_id"] == env_id and r["label"] == label]
            table[env_id][view][label] = entry
    return table


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def markdown(table: dict, args: argparse.Namespace, header: dict) -> str:
    def cell(entry: dict, metric: str) -> str:
        if entry[metric] is None:
            return "—"
        seeds = ", ".join("—" if v is None else f"{v:.2f}" for v in entry["per_seed"][metric])
        return f"{entry[metric]:.3f} ± {entry['std'][metric]:.3f} ({seeds})"

    lines = [
        "# VAGEN-style agent: strategies on DoorKey",
        "",
        f"`python benchmarks/vagen.py {' '.join(header['argv'])}` — {header['date']}, {header['wall_minutes']:.1f} min wall,",
        f"{args.steps} real env steps per run, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), "
        f"{args.eval_episodes} evaluation episodes per run (same env seeds for every strategy), {args.workers} worker(s).",
        f"Machine: {header['machine']}; load average before {header['load_before']}, after {header['load_after']}.",
        f"Sum over runs of training + evaluation time: {header['run_minutes']:.0f} min "
        f"(runs finished by an earlier invocation are reused, so this invocation's wall time can be shorter).",
        *([header["note"]] if header.get("note") else []),
        "",
        "Cells: mean ± std over seeds (per-seed values). normalized_score = (R - R_random) / (R_oracle - R_random)",
        "of the mean real return, R_random and R_oracle the random and BFS-oracle policies' mean returns on the same",
        "env seeds; return_ratio = real return / BFS-oracle optimal return per episode, averaged; accuracies are",
        "field-wise over all evaluation turns (a malformed turn counts 0); — = the strategy has no such part.",
        "Truth = the real env's symbolic state.",
        "",
    ]
    def reached(entry: dict) -> str:
        seeds = ", ".join("—" if v is None else f"{v:.0f}" for v in entry["per_seed"]["steps_to_0.9"])
        return "—" if entry["steps_to_0.9"] is None else f"{entry['steps_to_0.9']:.0f} ± {entry['std']['steps_to_0.9']:.0f} ({seeds})"

    views = {env_id: next(iter(by_view)) for env_id, by_view in table.items()}
    table = {env_id: by_view[views[env_id]] for env_id, by_view in table.items()}
    for env_id, rows in table.items():
        lines += [f"## {env_id} ({views[env_id]} view)", "", "| strategy | " + " | ".join(METRICS) + " | steps_to_0.9 |",
                  "|---" * (len(METRICS) + 2) + "|"]
        for label, entry in rows.items():
            lines.append(f"| {label} | " + " | ".join(cell(entry, m) for m in METRICS) + f" | {reached(entry)} |")
        lines.append("")
    lines += ["## WorldModeling: bi-level vs turn-level-only GAE", "", "| env | metric | bi-level | turn-level only |", "|---|---|---|---|"]
    for env_id, rows in table.items():
        if "WorldModeling" in rows and "WorldModeling-TurnGAE" in rows:
            for metric in METRICS:
                lines.append(f"| {env_id} | {metric} | {cell(rows['WorldModeling'], metric)} | {cell(rows['WorldModeling-TurnGAE'], metric)} |")
    lines.append("")
    return "\n".join(lines)


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["MiniGrid-DoorKey-5x5-v0", "MiniGrid-DoorKey-6x6-v0"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGY_RUNS), choices=list(STRATEGY_RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100352, help="real env steps per run (the same for every strategy); 100352 = 196 updates of the default 8 x 64 turns")
    parser.add_argument("--eval-episodes", type=int, default=64, help="evaluation episodes per run (at 16, one NoThink seed read 0.17 that read 0.31 over 128)")
    parser.add_argument("--eval-every", type=int, default=0, help="updates between evaluations during training, for steps_to_0.9 (0: final only)")
    parser.add_argument("--workers", type=int, default=2, help="runs trained at once (one process and one thread each)")
    parser.add_argument("--root", default="runs/bench_vagen", help="parent folder of the benchmark's run folders")
    parser.add_argument("--out", default=str(RESULTS), help="folder for vagen.md and vagen.json")
    parser.add_argument("--note", default="", help="a line for the table's header (e.g. how busy the machine was)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that an earlier invocation finished")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run, e.g. vagen.lr=0.001")
    args = parser.parse_args(argv)
    import scripts.config  # noqa: F401  (import once here: forked workers inherit it)
    header = {
        "argv": list(sys.argv[1:] if argv is None else argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}", "load_before": load_average(),
    }
    jobs = [
        {
            "env_id": env_id, "label": label, "strategy": STRATEGY_RUNS[label][0], "advantage": STRATEGY_RUNS[label][1],
            "seed": seed, "steps": args.steps, "eval_episodes": args.eval_episodes, "root": args.root,
            "view": VIEW, "eval_every": args.eval_every,
            "overrides": list(args.overrides), "fresh": args.fresh, "name": f"{env_id.replace('MiniGrid-', '')}_{VIEW}_{label}_s{seed}",
        }
        for env_id in args.envs for seed in args.seeds for label in args.strategies
    ]
    started = time.time()
    if args.workers > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            results = list(pool.map(run_one, jobs))
    else:
        results = [run_one(job) for job in jobs]
    header["wall_minutes"] = (time.time() - started) / 60
    header["run_minutes"] = sum(float(r["metrics"].get("wall_seconds", 0.0)) for r in results) / 60
    header["note"] = args.note
    header["load_after"] = load_average()
    table = summarise(results, args.envs, args.strategies, VIEW)
    out = Path(args.out)
    atomic_write_text(out / "vagen.md", markdown(table, args, header))
    atomic_write_json(out / "vagen.json", table)
    print(json.dumps(table, sort_keys=True))
    return table


if __name__ == "__main__":
    main()
