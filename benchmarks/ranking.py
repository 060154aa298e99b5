#!/usr/bin/env python
"""Benchmark: does the world model rank a zoo of policies as the real env does, and how far are its
imagined returns from the real ones? The field's metrics with 95% bootstrap intervals.

    python benchmarks/ranking.py [--envs doorkey-5x5,doorkey-6x6,...] [--views full,partial] [--episodes 100]

Per env and view (``--views``, full by default): one quickstart run from scratch with fixed seeds — data (``FRAMES`` frames, a
random + epsilon-oracle mix so the model sees the places good policies go), tokenizer, dynamics,
the Dreamer agent with a checkpoint every ``--every`` updates — then the other agents of the zoo,
then one evaluation of the whole zoo, each policy ``--episodes`` episodes in the real env and in
the model from the same first frames:

- the scripted family: random, sticky random at 4 repeat rates, epsilon-oracle at 15 epsilons,
  the oracle (21 policies);
- the Dreamer agent and up to ``--checkpoints`` of its checkpoints along training;
- the PPO baseline trained ``--ppo-steps`` real steps on the run's tokens, and up to
  ``--checkpoints`` of its policies along training (one per evaluation, every 8 updates);
- the VAGEN agent of each strategy in ``--vagen`` (``--vagen-steps`` real turns each, its own run
  folder; full view only), acting on frames (decoded from the model's tokens in imagination);
- stable-baselines3 PPO on MiniGrid's native observation (``ImgObsWrapper``), saved at each of
  ``--sb3-steps``: an outside policy, evaluated through its ``.zip`` (skipped, and said so, when
  the ``sb3`` extra is not installed);
- every spec or ``.pt`` given with ``--extra``.

Prints progress and one JSON object last (also ``benchmarks/results/<--results>.json``):
``{env_id: {view: {"num_policies", "episodes", "mae", "mae_normalized", "spearman", "kendall",
"pearson", "regret_at_1", "regret_at_3", "mmrv", "trust_gap_spearman", "<metric>_ci", ...,
"eval_seconds", "wall_seconds", "zoo": {family: count}}}}, "machine": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import finish, machine

FRAMES = {"doorkey-5x5": 10_000, "doorkey-6x6": 50_000, "doorkey-8x8": 100_000, "fourrooms": 100_000,
          "lavagap-s7": 50_000, "multiroom-n2-s4": 50_000, "keycorridor-s3r1": 100_000,
          "dynamic-obstacles-6x6": 50_000}
MIX = "random:0.6,epsilon_oracle@0.5:0.2,epsilon_oracle@0.2:0.2"
SCRIPTED = ["random", *(f"sticky_random@{p}" for p in (0.25, 0.5, 0.75, 0.9)),
            *(f"epsilon_oracle@{e}" for e in (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85,
                                               0.9, 0.95)),
            "oracle"]
KEYS = ("num_policies", "episodes", "mae", "mae_normalized", "spearman", "kendall", "pearson", "regret_at_1",
        "regret_at_3", "mmrv", "success_calibration_error", "trust_gap_spearman", "eval_seconds")


def log(message: str) -> None:
    print(f"[ranking {time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_sb3(env_id: str, folder: Path, seed: int, budgets: list[int]) -> list[str]:
    """stable-baselines3 PPO on MiniGrid's native observation, saved at each budget (real steps) as
    ``sb3-ppo-<steps>.zip``; returns their paths, or none when stable_baselines3 is not installed."""
    try:
        import gymnasium as gym
        import minigrid  # noqa: F401  (registers the envs)
        from minigrid.wrappers import ImgObsWrapper
        from stable_baselines3 import PPO
        from stable_baselines3.common.env_util import make_vec_env
    except ImportError:
        log("stable_baselines3 is not installed (the 'sb3' extra): no outside SB3 policy in the zoo")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"sb3-ppo-{steps}.zip" for steps in budgets]
    if all(path.is_file() for path in paths):
        return [str(path) for path in paths]
    envs = make_vec_env(lambda: ImgObsWrapper(gym.make(env_id)), n_envs=8, seed=seed)
    # The encoding holds small integers (object, colour, state), not pixels: no division by 255.
    model = PPO("MlpPolicy", envs, n_steps=128, batch_size=256, n_epochs=4, learning_rate=2.5e-4, ent_coef=0.01,
                policy_kwargs={"normalize_images": False}, seed=seed, device="cpu", verbose=0)
    for steps, path in zip(budgets, paths):
        model.learn(total_timesteps=steps - model.num_timesteps, reset_num_timesteps=False)
        model.save(str(path))
        log(f"{env_id}: stable-baselines3 PPO saved at {model.num_timesteps} steps ({path.name})")
    envs.close()
    return [str(path) for path in paths]


def family(name: str) -> str:
    """The zoo family of a policy's name: dreamer, ppo, vagen, sb3, scripted or extra."""
    for prefix in ("dreamer", "ppo", "vagen", "sb3"):
        if name == prefix or name.startswith((f"{prefix}@", f"{prefix}-")):
            return prefix
    return "scripted" if name.split("@")[0] in {s.split("@")[0] for s in SCRIPTED} else "extra"


def by_family(rows: list[dict]) -> dict:
    """How many policies of each family the zoo held, and the mean |imagined - real| of each."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(family(row["policy"]), []).append(abs(row["return_gap"]))
    return {"zoo": {k: len(v) for k, v in sorted(groups.items())},
            "mae_by_family": {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items())}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--envs", default="doorkey-5x5,doorkey-6x6,lavagap-s7,keycorridor-s3r1,dynamic-obstacles-6x6",
                        help="env presets, comma-separated")
    parser.add_argument("--views", default="full", help="views, comma-separated: full, partial (egocentric)")
    parser.add_argument("--episodes", type=int, default=100, help="episodes per policy in each world")
    parser.add_argument("--every", type=int, default=50, help="Dreamer checkpoint interval (updates)")
    parser.add_argument("--checkpoints", type=int, default=14, help="checkpoints along training of each agent in the zoo")
    parser.add_argument("--ppo-steps", type=int, default=50_000, help="real env steps of the PPO baseline (0: none)")
    parser.add_argument("--vagen", default="NoThink,WorldModeling", help="VAGEN strategies in the zoo (empty: none)")
    parser.add_argument("--vagen-steps", type=int, default=20_480, help="real turns of each VAGEN agent")
    parser.add_argument("--sb3-steps", default="25000,50000,100000", help="stable-baselines3 PPO budgets (empty: none)")
    parser.add_argument("--extra", default="", help="more policies for the zoo (comma-separated specs or .pt paths)")
    parser.add_argument("--root", default="/tmp/bench-ranking", help="where the runs go")
    parser.add_argument("--results", default="ranking", help="name of the JSON written under benchmarks/results/")
    args, overrides = parser.parse_known_args(argv)

    from benchmarks.ppo import results_key
    from scripts import quickstart, train_ppo, train_vagen

    out: dict = {}
    views = [v.strip() for v in args.views.split(",") if v.strip()]
    if set(views) - {"full", "partial"}:
        raise SystemExit(f"--views: choose from full, partial; got '{args.views}'")
    envs = [e.strip() for e in args.envs.split(",") if e.strip()]
    unknown = [env for env in envs if env not in FRAMES]
    if unknown:
        raise SystemExit(f"--envs: no frame budget for {unknown}: choose from {sorted(FRAMES)}")
    for env, view in ((env, view) for env in envs for view in views):
        env_id, name = results_key(env), f"ranking-{env}" + ("" if view == "full" else f"-{view}")
        common = ["--env", env, f"env.obs={view}", f"run.root={args.root}", "run.progress=false", *overrides]
        argv_run = [*common, f"run.name={name}", f"collect.num_steps={FRAMES[env]}", f"collect.policy_mix={MIX}",
                    f"dreamer.checkpoint_every={args.every}", f"evaluate.episodes={args.episodes}",
                    f"evaluate.max_checkpoints={args.checkpoints}", "evaluate.gif_policies=dreamer"]
        started = time.perf_counter()
        log(f"{env} ({view}): {FRAMES[env]} frames; the world model and the Dreamer agent")
        quickstart.main([*argv_run, "evaluate.policies=dreamer,random,oracle"])
        zoo = ["dreamer", "checkpoints", *SCRIPTED]
        if args.ppo_steps > 0:
            log(f"{env} ({view}): the PPO baseline, {args.ppo_steps} real steps")
            train_ppo.main([*common, f"run.name={name}", f"ppo.total_env_steps={args.ppo_steps}", "ppo.eval_every=8"])
            zoo += ["ppo", "ppo_checkpoints"]
        strategies = [s.strip() for s in args.vagen.split(",") if s.strip()]
        if strategies and view != "full":
            log(f"{env} ({view}): no VAGEN agent (it reads the full view only)")
            strategies = []
        for strategy in strategies:
            log(f"{env} ({view}): the VAGEN agent ({strategy}), {args.vagen_steps} real turns")
            folder = f"{name}-vagen-{strategy}"
            train_vagen.main([*common, f"run.name={folder}", f"vagen.strategy={strategy}",
                              f"vagen.total_env_steps={args.vagen_steps}"])
            zoo.append(str(Path(args.root) / folder / "vagen.pt"))
        budgets = [int(b) for b in args.sb3_steps.split(",") if b.strip()]
        if budgets:
            sb3 = train_sb3(env_id, Path(args.root) / f"{name}-sb3", seed=0, budgets=budgets)
            zoo += sb3
        zoo += [p for p in args.extra.split(",") if p]
        log(f"{env} ({view}): evaluating the zoo")
        result = quickstart.main([*argv_run, f"evaluate.policies={','.join(zoo)}"])
        metrics = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())["evaluate"]
        row = {k: metrics.get(k) for k in KEYS}
        row.update({f"{k}_ci": metrics.get(f"{k}_ci") for k in KEYS if metrics.get(f"{k}_ci") is not None})
        row["wall_seconds"] = round(time.perf_counter() - started, 1)
        row["flags"] = len(metrics.get("flags", []))
        row.update(by_family(metrics["policies"]))
        out.setdefault(env_id, {})[view] = row
        log(f"{env} ({view}): spearman {row['spearman']}, mae_normalized {row['mae_normalized']}, "
            f"regret_at_1 {row['regret_at_1']} over {row['num_policies']} policies, evaluated in {row['eval_seconds']} s")
    out["machine"] = machine()
    finish(args.results, out)
    return out


if __name__ == "__main__":
    main()
