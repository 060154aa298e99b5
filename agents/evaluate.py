"""Evaluation of a set of policies in the real env and in the dream, from the same first frames.

For every policy (the trained agent, its checkpoints along training, scripted baselines, any saved
policy): real return over N episodes from fixed env seeds, imagined return from the same first
frames (the world model started on the real first frame, the policy fed the model's tokens and
state-head predictions), their gap, the oracle-normalised score
``(R - R_random) / (R_oracle - R_random)``, and over the whole set the field's metrics of imagined
against real returns (``agents/metrics.py``: DOPE's absolute error, rank correlations and regret@k,
SIMPLER's Pearson and MMRV, the success calibration), each with a 95% bootstrap interval over the
episode seeds: does the model score and rank policies as the env does?

Writes ``metrics.json`` (section ``evaluate``), ``report.md``, ``media/evaluate_scatter.png``,
``media/evaluate_learning_curve.png`` and ``media/evaluate_<policy>_real_vs_imagined.gif``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from agents.metrics import METRICS, evaluation_metrics, rank_agreement
from agents.policy import Policy, PolicyInput, make_policy, read_checkpoint
from common.config import param
from common.runs import RunDir, write_gif, write_png
from common.seeding import derive_seed, seed_everything
from envs.native_obs import native_observations
from envs.state import StateCodec
from worldmodel.imagine import step_aware_reward
from worldmodel.tokenizer import encode_frames

REPORT_NAME = "report.md"
IMAGINED_REWARDS = ("step_aware", "model")


@dataclass
class EvaluateConfig:
    """Evaluation of policies: real vs imagined returns (section ``evaluate``)."""

    policies: str = param(
        "dreamer,checkpoints,random,sticky_random@0.75,epsilon_oracle@0.75,epsilon_oracle@0.5,"
        "epsilon_oracle@0.25,epsilon_oracle@0.1,oracle",
        "comma-separated policies: dreamer (the run's agent), checkpoints (its checkpoints along training), "
        "vagen (the run's VAGEN agent), ppo and ppo_checkpoints (the run's PPO baseline, along training), random, oracle, epsilon_oracle@EPS, sticky_random@P, a .pt path, or your own: "
        "package.module:attr, a TorchScript .pt, a stable-baselines3 .zip (docs/your_policy.md)",
    )
    episodes: int = param(20, "episodes per policy, in the real env and in imagination", min=1)
    seed: int = param(100_000, "env seed of episode 0 (episode i: seed + i); far from the collection seeds", min=0)
    max_steps: int = param(0, "imagined episode step limit (0: the real env's own limit)", min=0)
    gif_policies: str = param("dreamer,oracle,random", "policies whose first episode is shown real | imagined side by side")
    gif_max_steps: int = param(60, "frames per GIF at most", min=1)
    gif_scale: int = param(4, "pixel repeat of the GIF frames", min=1)
    max_checkpoints: int = param(6, "at most this many checkpoints along training of each agent (evenly spread, last included)",
                                 min=0)
    imagined_reward: str = param(
        "step_aware", "what an imagined success pays in the headline imagined return: step_aware (MiniGrid's reward "
        "1 - 0.9 t / max_steps at the imagined step t: the step count is not in the frame, so the model cannot know "
        "it) or model (the reward head's value); both are always reported", choices=IMAGINED_REWARDS)
    trust_gap: float = param(0.1, "flag, in the report's headline, every policy whose |imagined - real| return exceeds this",
                             min=0)
    bootstrap: int = param(1000, "bootstrap resamples of the episode seeds for the metrics' 95% intervals "
                           "(<metric>_ci; agents/metrics.py)", min=100)


# ---------------------------------------------------------------------------------------------
# Metrics (pure functions)
# ---------------------------------------------------------------------------------------------


def normalized_score(value: float, random_return: float, oracle_return: float) -> float:
    """``(value - R_random) / (R_oracle - R_random)``: 0 is random, 1 is the oracle; nan if they tie."""
    span = oracle_return - random_return
    if abs(span) < 1e-12:
        return float("nan")
    return float((value - random_return) / span)


TRAINED_NAMES = ("dreamer", "vagen", "ppo")


def is_trained(row: dict) -> bool:
    """A policy trained by the sandbox (the agents and their checkpoints), as opposed to a reference."""
    return row["policy"].split("@")[0] in TRAINED_NAMES or row.get("training_step") is not None


def trust_flags(rows: list[dict], gap_limit: float, spearman: float | None = None) -> tuple[list[str], bool]:
    """Which imagined figures not to trust, one line each, and whether the run's agent figures can
    be trusted. A policy is flagged when its imagined return parts from its real one by more than
    ``gap_limit`` and, where the row carries its 95% interval (``return_gap_ci``), by more than
    noise (the interval excludes 0). Trained agents come first: one of them flagged (an agent
    trained in imagination that imagines more than it gets has learned the model's errors), or a
    negative rank correlation (the model orders the policies backwards), makes the run untrusted."""
    flags, trusted = [], True
    for row in sorted(rows, key=lambda r: not is_trained(r)):
        gap = row["imagined_return"] - row["real_return"]
        interval = row.get("return_gap_ci")
        beyond_noise = interval is None or not (interval[0] <= 0 <= interval[1])
        if math.isfinite(gap) and abs(gap) > gap_limit and beyond_noise:
            kind = "imagines more than the real env pays" if gap > 0 else "gets more than it imagines"
            noise = f", 95% interval [{interval[0]:.3f}, {interval[1]:.3f}]" if interval is not None else ""
            flags.append(f"{row['policy']} {kind}: imagined {row['imagined_return']:.3f}, real "
                         f"{row['real_return']:.3f} (gap {abs(gap):.3f} > evaluate.trust_gap {gap_limit:g}{noise})")
            trusted &= not is_trained(row)
    if spearman is not None and math.isfinite(spearman) and spearman < 0:
        flags.append(f"the imagined ranking of the policies is inverted (spearman {spearman:.3f} < 0)")
        trusted = False
    return flags, trusted


def gap_intervals(imagined: np.ndarray, real: np.ndarray, num_resamples: int, seed: int,
                  level: float = 0.95) -> np.ndarray:
    """(P, 2) percentile bootstrap intervals of each policy's mean imagined - real return, from
    per-episode returns (P, N) paired by episode seed (the resampling unit, as in the metrics)."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, imagined.shape[1], size=(int(num_resamples), imagined.shape[1]))
    gaps = (imagined[:, index] - real[:, index]).mean(-1)  # (P, B)
    tail = 100 * (1 - level) / 2
    return np.percentile(gaps, [tail, 100 - tail], axis=1).T


def _json_number(value: float) -> float | None:
    """JSON has no nan: a missing value is null."""
    return None if value is None or not math.isfinite(value) else float(value)


def _json_value(value: Any) -> Any:
    """A headline or row value for ``metrics.json``: floats (also inside an interval's list) nan-free."""
    if isinstance(value, float):
        return _json_number(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """Returns of a batch of episodes, and the frames of the first one (for videos).

    returns, lengths: (N,); success: (N,) bool (a positive reward was collected); frames: (T, H, W, 3).
    returns_step_aware (imagination only): the model's predicted successes paid at MiniGrid's reward
    for the step they happen at, ``1 - 0.9 * step / max_steps`` (see :func:`run_imagined`).
    uncertainty (imagination only, where the world model has the signal): (N,) the model's mean
    doubt per step along each episode (:func:`worldmodel.uncertainty.step_uncertainty`, plus
    :func:`~worldmodel.uncertainty.state_uncertainty` for a policy that reads the state head).
    """

    returns: np.ndarray
    lengths: np.ndarray
    success: np.ndarray
    frames: np.ndarray | None = None
    returns_step_aware: np.ndarray | None = None
    first_states: np.ndarray | None = None  # (N, S) the real episodes' first symbolic states
    uncertainty: np.ndarray | None = None


StepObserver = Callable[[int, np.ndarray, np.ndarray], None]
"""``on_step(row, state, next_state)`` of :func:`run_real`: row ``row`` just stepped from symbolic
state ``state`` (S,) to ``next_state`` (S,) (the arrays are only valid during the call)."""


def run_real(policy: Policy, env_cfg: Any, seeds: Sequence[int], tokenizer: Any, policy_seed: int,
             record_first: bool = False, max_record: int = 60, on_step: StepObserver | None = None) -> Rollouts:
    """Play ``policy`` in len(seeds) real envs in lockstep, env i reset with ``seeds[i]``.

    ``tokenizer`` is only used for a policy that reads tokens (None will do otherwise). ``on_step``,
    if given, is called after every real step of a live row, in row order, before the next
    :meth:`Policy.act`: a caller scores there what the policy said about that step (the VAGEN
    agent's state estimate and prediction against the truth before and after it).
    """
    from envs.make import make_env_from_config

    envs = [make_env_from_config(env_cfg) for _ in seeds]
    frames, states = [], []
    for env, seed in zip(envs, seeds):
        frame, info = env.reset(seed=int(seed))
        frames.append(frame), states.append(info["state"])
    frames_np, states_np = np.stack(frames), np.stack(states)
    first_states = states_np.copy()
    codec = StateCodec(envs[0].unwrapped.width, envs[0].unwrapped.height)  # KeyCorridor's grid is not square
    count = len(seeds)
    alive = np.ones(count, dtype=bool)
    returns, lengths, success = np.zeros(count), np.zeros(count, dtype=np.int64), np.zeros(count, dtype=bool)
    recorded = [frames_np[0]] if record_first else []
    policy.reset(count, seed=policy_seed)
    while alive.any():
        inp = PolicyInput(
            tokens=encode_frames(tokenizer, frames_np) if "tokens" in policy.inputs else None,
            frames=frames_np if "frames" in policy.inputs else None,
            states=states_np if "states" in policy.inputs else None,
            minigrid=native_observations(states_np, codec) if "minigrid" in policy.inputs else None,
        )
        actions = policy.act(inp)
        for i in np.flatnonzero(alive):
            frame, reward, terminated, truncated, info = envs[i].step(int(actions[i]))
            if on_step is not None:
                on_step(int(i), states_np[i], info["state"])
            frames_np[i], states_np[i] = frame, info["state"]
            returns[i] += reward
            lengths[i] += 1
            success[i] |= reward > 0
            if terminated or truncated:
                alive[i] = False
            if i == 0 and record_first and len(recorded) < max_record:
                recorded.append(frame)
    for env in envs:
        env.close()
    return Rollouts(returns, lengths, success, np.stack(recorded) if record_first else None, first_states=first_states)


REFERENCE_POLICIES = ("random", "oracle")
GAP_STREAM = 0x6A9  # the per-policy gap intervals' stream
BOOTSTRAP_STREAM = 0xB0075  # derive_seed(run.seed, evaluate.seed, this): the bootstrap's own stream, apart from
# the policies' (derive_seed(run.seed, evaluate.seed, policy index))


def reference_returns(env_cfg: Any, seeds: Sequence[int], policy_seed: int, env_id: str = "") -> dict[str, float]:
    """Mean real returns ``{"random": R_random, "oracle": R_oracle}`` over the env seeds ``seeds``:
    the two ends of :func:`normalized_score`, for a caller whose policy set lacks them.

    The same policies played the same way as :func:`evaluate`'s ``random`` and ``oracle`` rows
    (``make_policy`` of the spec, :func:`run_real` over all seeds in lockstep, the mean return).
    """
    return {
        spec: float(run_real(make_policy(spec, env_id=env_id), env_cfg, seeds, None, policy_seed).returns.mean())
        for spec in REFERENCE_POLICIES
    }


@torch.no_grad()
def run_imagined(policy: Policy, world_model: Any, first_frames: np.ndarray, first_states: np.ndarray, max_steps: int,
                 policy_seed: int, record_first: bool = False, max_record: int = 60,
                 env_max_steps: int | None = None) -> Rollouts:
    """Play ``policy`` in the world model from real first frames (N, H, W, 3) with states (N, S).

    The first step sees the real first frame's tokens and state; later ones the model's tokens and
    its state head. An episode ends at the model's first predicted termination or at ``max_steps``.
    ``env_max_steps`` (default ``max_steps``): the real env's step limit, for the step-aware return.
    """
    env_max_steps = int(env_max_steps or max_steps)
    tokenizer = world_model.tokenizer
    tokens = encode_frames(tokenizer, first_frames)
    count = len(tokens)
    tokens = torch.as_tensor(world_model.reset(torch.as_tensor(tokens)[:, None], torch.zeros(count, 0, dtype=torch.long)))
    tokens = tokens.cpu().numpy().astype(np.int64)
    states = np.asarray(first_states).astype(np.int64)
    alive = np.ones(count, dtype=bool)
    returns, lengths, success = np.zeros(count), np.zeros(count, dtype=np.int64), np.zeros(count, dtype=bool)
    step_aware = np.zeros(count)
    doubt = np.zeros(count) if hasattr(world_model, "uncertainty") else None
    reads_state = bool({"states", "minigrid"} & set(policy.inputs)) and hasattr(world_model, "state_uncertainty")
    codec = None
    if "minigrid" in policy.inputs:  # the native observation needs the grid's width: KeyCorridor's is not square
        model_config = getattr(world_model, "config", None)
        codec = (StateCodec(model_config.state_width, model_config.state_height) if hasattr(model_config, "state_width")
                 else StateCodec.for_array_size(states.shape[1]))
    recorded = [np.asarray(tokenizer.decode(tokens[:1]).cpu())[0]] if record_first else []
    policy.reset(count, seed=policy_seed)
    for step_index in range(max_steps):
        if not alive.any():
            break
        inp = PolicyInput(
            tokens=tokens if "tokens" in policy.inputs else None,
            frames=tokenizer.decode(tokens).cpu().numpy() if "frames" in policy.inputs else None,
            states=states if "states" in policy.inputs else None,
            minigrid=native_observations(states, codec) if "minigrid" in policy.inputs else None,
        )
        actions = policy.act(inp)
        if doubt is not None:  # the model's doubt about the step, and about the state the policy read
            step_doubt = world_model.uncertainty(torch.as_tensor(actions, dtype=torch.long)).cpu().numpy()
            if reads_state:
                step_doubt = step_doubt + world_model.state_uncertainty().cpu().numpy()
            doubt += np.where(alive, step_doubt, 0.0)
        step = world_model.step(torch.as_tensor(actions, dtype=torch.long))
        reward = torch.as_tensor(step.reward).float().cpu().numpy()
        terminated = torch.as_tensor(step.terminated).bool().cpu().numpy()
        returns += np.where(alive, reward, 0.0)
        # MiniGrid pays 1 - 0.9 * step_count / max_steps on success: the step count is not in the
        # frame, so a model can only guess it, but from a real first frame it is exactly known.
        step_aware += np.where(alive, step_aware_reward(reward, step_index + 1, env_max_steps), 0.0)
        lengths += alive
        success |= alive & (reward > 0)
        tokens = torch.as_tensor(step.tokens).cpu().numpy().astype(np.int64)
        if {"states", "minigrid"} & set(policy.inputs):  # the state head runs only for policies that read it
            states = torch.as_tensor(step.state).cpu().numpy().astype(np.int64)
        if record_first and alive[0] and len(recorded) < max_record:
            recorded.append(np.asarray(tokenizer.decode(tokens[:1]).cpu())[0])
        alive &= ~terminated
    return Rollouts(returns, lengths, success, np.stack(recorded) if record_first else None, step_aware,
                    uncertainty=None if doubt is None else doubt / np.maximum(lengths, 1))


def side_by_side(real: np.ndarray, imagined: np.ndarray, gap: int = 4) -> np.ndarray:
    """(T1, H, W, 3) and (T2, H, W, 3) -> (max T, H, 2W + gap, 3); the shorter one holds its last frame."""
    length = max(len(real), len(imagined))
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], length - len(x), axis=0)]) if len(x) < length else x  # noqa: E731
    real, imagined = pad(real), pad(imagined)
    spacer = np.full((length, real.shape[1], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([real, spacer, imagined], axis=2)


# ---------------------------------------------------------------------------------------------
# The policy set
# ---------------------------------------------------------------------------------------------


def resolve_policies(spec: str, run_path: Path, env_id: str, max_checkpoints: int) -> list[Policy]:
    """Build the policies named by ``spec`` (see ``EvaluateConfig.policies``), in order, without duplicates."""
    from agents import train_dreamer, train_ppo

    def saved(path: Path, name: str) -> Policy:
        policy = make_policy(str(path))
        policy.name = name
        return policy

    def along_training(paths: list[Path], final: Path) -> list[Policy]:
        if len(paths) > max_checkpoints:
            picks = np.unique(np.linspace(len(paths) - 1, 0, max_checkpoints).round().astype(int))  # the last first
            paths = [paths[i] for i in picks]
        final_step = read_checkpoint(final).get("training_step") if final.is_file() else None
        policies = [make_policy(str(path)) for path in paths]
        # the final agent is already in the set under its own name
        return [p for p in policies if getattr(p, "training_step", None) != final_step]

    dreamer_final, ppo_final = run_path / train_dreamer.FINAL_NAME, run_path / train_ppo.FINAL_NAME
    policies: list[Policy] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item == "dreamer":
            policies.append(saved(dreamer_final, "dreamer"))
        elif item == "vagen":
            policies.append(saved(run_path / "vagen.pt", "vagen"))
        elif item == "ppo":
            policies.append(saved(ppo_final, "ppo"))
        elif item == "checkpoints":
            policies += along_training(train_dreamer.checkpoints_along_training(run_path), dreamer_final)
        elif item == "ppo_checkpoints":
            policies += along_training(train_ppo.checkpoints_along_training(run_path), ppo_final)
        else:
            policies.append(make_policy(item, env_id=env_id))
    names = [p.name for p in policies]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"evaluate.policies names {duplicates} more than once")
    return policies


def _check_tokens(policy: Policy, tokenizer: Any) -> None:
    wanted = getattr(policy, "tokenizer_identity", "")
    if wanted and wanted != tokenizer.identity:
        raise ValueError(f"policy '{policy.name}' was trained on tokens of tokenizer {wanted}, "
                         f"but this run's tokenizer is {tokenizer.identity}")


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def evaluate(cfg: Any, run: RunDir, world_model: Any | None = None) -> dict[str, Any]:
    """Evaluate ``cfg.evaluate.policies`` in the real env and in the run's world model; write the report."""
    from envs.make import make_env_from_config
    from worldmodel.imagine import load_world_model

    stage = cfg.evaluate
    seed_everything(cfg.run.seed)
    if cfg.run.threads > 0:
        torch.set_num_threads(int(cfg.run.threads))
    started = time.perf_counter()
    world_model = world_model if world_model is not None else load_world_model(run_dir=run.path, device=str(cfg.run.device))
    tokenizer = world_model.tokenizer
    policies = resolve_policies(str(stage.policies), run.path, str(cfg.env.id), int(stage.max_checkpoints))
    names = [p.name for p in policies]
    for required in REFERENCE_POLICIES:
        if required not in names:
            raise ValueError(f"evaluate.policies must include '{required}': the normalised score is relative to it")
    seeds = [int(stage.seed) + i for i in range(int(stage.episodes))]

    # First frames and states of the evaluation episodes: the dream starts where the env starts.
    probe = make_env_from_config(cfg.env)
    firsts = [probe.reset(seed=s) for s in seeds]
    first_frames = np.stack([f for f, _ in firsts])
    first_states = np.stack([i["state"] for _, i in firsts])
    env_max_steps = int(probe.unwrapped.max_steps)
    max_steps = int(stage.max_steps) or env_max_steps
    probe.close()

    chosen = str(stage.imagined_reward)
    if chosen not in IMAGINED_REWARDS:
        raise ValueError(f"evaluate.imagined_reward: unknown '{chosen}', choose one of {IMAGINED_REWARDS}")
    gif_names = {n.strip() for n in str(stage.gif_policies).split(",") if n.strip()}
    rows, gifs = [], {}
    episodes: dict[str, list[np.ndarray]] = {"imagined": [], "real": [], "imagined_success": [], "real_success": []}
    bar = None
    if cfg.run.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(policies), desc="evaluate", unit="policy", dynamic_ncols=True)
    for index, policy in enumerate(policies):
        _check_tokens(policy, tokenizer)
        policy_seed = derive_seed(int(cfg.run.seed), int(stage.seed), index)
        record = policy.name in gif_names
        real = run_real(policy, cfg.env, seeds, tokenizer, policy_seed, record, int(stage.gif_max_steps))
        imagined = run_imagined(policy, world_model, first_frames, first_states, max_steps, policy_seed, record,
                                int(stage.gif_max_steps), env_max_steps=env_max_steps)
        rows.append({
            "policy": policy.name,
            "training_step": getattr(policy, "training_step", None),
            "real_return": float(real.returns.mean()), "real_return_std": float(real.returns.std()),
            "real_success": float(real.success.mean()), "real_length": float(real.lengths.mean()),
            "imagined_success": float(imagined.success.mean()), "imagined_length": float(imagined.lengths.mean()),
            "imagined_return_model": float(imagined.returns.mean()),
            "imagined_return_model_std": float(imagined.returns.std()),
            "imagined_return_step_aware": float(imagined.returns_step_aware.mean()),
            "imagined_return_step_aware_std": float(imagined.returns_step_aware.std()),
            "uncertainty": None if imagined.uncertainty is None else float(imagined.uncertainty.mean()),
        })
        rows[-1]["imagined_return"] = rows[-1][f"imagined_return_{chosen}"]
        rows[-1]["imagined_return_std"] = rows[-1][f"imagined_return_{chosen}_std"]
        rows[-1]["success_gap"] = rows[-1]["imagined_success"] - rows[-1]["real_success"]
        episodes["imagined"].append(imagined.returns if chosen == "model" else imagined.returns_step_aware)
        episodes["real"].append(real.returns)
        episodes["imagined_success"].append(imagined.success)
        episodes["real_success"].append(real.success)
        if record:
            gifs[policy.name] = side_by_side(real.frames, imagined.frames)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(policy=policy.name, real=f"{rows[-1]['real_return']:.3f}",
                            imagined=f"{rows[-1]['imagined_return']:.3f}", refresh=False)
    if bar is not None:
        bar.close()

    by_name = {row["policy"]: row for row in rows}
    random_return, oracle_return = by_name["random"]["real_return"], by_name["oracle"]["real_return"]
    for row in rows:
        row["normalized_score"] = normalized_score(row["real_return"], random_return, oracle_return)
        for suffix in ("", "_model", "_step_aware"):
            row[f"return_gap{suffix}"] = row[f"imagined_return{suffix}"] - row["real_return"]
    headline: dict[str, Any] = {"num_policies": len(rows), "episodes": int(stage.episodes), "imagined_reward": chosen}
    # The field's metrics on the headline imagined return, with bootstrap intervals over episode seeds.
    headline.update(evaluation_metrics(
        **{k: np.stack(v) for k, v in episodes.items()}, random_index=names.index("random"),
        oracle_index=names.index("oracle"), num_resamples=int(stage.bootstrap),
        seed=derive_seed(int(cfg.run.seed), int(stage.seed), BOOTSTRAP_STREAM)))
    for suffix in ("_model", "_step_aware"):
        ranks = rank_agreement([r[f"imagined_return{suffix}"] for r in rows], [r["real_return"] for r in rows])
        headline.update({f"{k}{suffix}": v for k, v in ranks.items()})
    headline.update(random_return=random_return, oracle_return=oracle_return)
    if all(row["uncertainty"] is not None for row in rows):  # does the model's doubt predict its gap?
        headline["trust_gap_spearman"] = rank_agreement([r["uncertainty"] for r in rows],
                                                        [abs(r["return_gap"]) for r in rows])["spearman"]
    agent = by_name.get("dreamer")
    if agent is not None:
        headline.update(normalized_score=agent["normalized_score"], real_return=agent["real_return"])
        for suffix in ("", "_model", "_step_aware"):
            headline[f"imagined_return{suffix}"] = agent[f"imagined_return{suffix}"]
            headline[f"return_gap{suffix}"] = abs(agent[f"return_gap{suffix}"])
    intervals = gap_intervals(np.stack(episodes["imagined"]), np.stack(episodes["real"]), int(stage.bootstrap),
                              derive_seed(int(cfg.run.seed), int(stage.seed), GAP_STREAM))
    for row, interval in zip(rows, intervals):
        row["return_gap_ci"] = [float(interval[0]), float(interval[1])]
    headline["flags"], headline["trusted"] = trust_flags(rows, float(stage.trust_gap), headline.get("spearman"))
    headline["eval_seconds"] = round(time.perf_counter() - started, 2)

    # ------------------------------------------------------------------ artifacts
    media = run.media
    for name, frames in gifs.items():
        write_gif(media / f"evaluate_{_slug(name)}_real_vs_imagined.gif", frames, fps=4, scale=int(stage.gif_scale))
    scatter = scatter_plot(rows)
    write_png(media / "evaluate_scatter.png", scatter)
    history = _training_history(run.path)
    write_png(media / "evaluate_learning_curve.png", learning_curve_plot(rows, history))
    metrics = {k: _json_value(v) for k, v in headline.items()}
    metrics["policies"] = [{k: _json_value(v) for k, v in row.items()} for row in rows]
    run.update_metrics("evaluate", metrics)
    from common.atomic import atomic_write_text

    atomic_write_text(run / REPORT_NAME, format_report(cfg, headline, rows, sorted(gifs), run.path))
    return metrics


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _training_history(run_path: Path) -> list[dict]:
    from agents.train_dreamer import FINAL_NAME

    path = run_path / FINAL_NAME
    return list(read_checkpoint(path).get("history", [])) if path.is_file() else []


def _figure_to_array(figure: Any) -> np.ndarray:
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    import matplotlib.pyplot as plt

    plt.close(figure)
    return image


def scatter_plot(rows: list[dict]) -> np.ndarray:
    """Imagined vs real return, one labelled point per policy, with the diagonal: (H, W, 3) uint8."""
    return grouped_scatter_plot({"": rows})


def grouped_scatter_plot(groups: dict[str, list[dict]]) -> np.ndarray:
    """:func:`scatter_plot` of several policy sets (runs, envs), one colour per named group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 5) if len(groups) == 1 else (7, 6), dpi=100)
    values = [v for rows in groups.values() for r in rows for v in (r["real_return"], r["imagined_return"])]
    low, high = min(values + [0.0]) - 0.05, max(values + [1.0]) + 0.05
    axis.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="imagined = real")
    for index, (name, rows) in enumerate(groups.items()):
        axis.scatter([r["real_return"] for r in rows], [r["imagined_return"] for r in rows],
                     color=f"C{index}" if name else "tab:blue", label=name or None)
        for row in rows:
            axis.annotate(row["policy"], (row["real_return"], row["imagined_return"]), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
    axis.set_xlim(low, high), axis.set_ylim(low, high)
    axis.set_xlabel("real return"), axis.set_ylabel("imagined return")
    axis.set_title("imagined vs real return per policy")
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return _figure_to_array(figure)


def learning_curve_plot(rows: list[dict], history: list[dict]) -> np.ndarray:
    """Imagined return during training, and real/imagined return of the checkpoints: (H, W, 3) uint8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    if history:
        axis.plot([h["step"] for h in history], [h["imagined_return"] for h in history], color="tab:orange",
                  alpha=0.5, label="training batch: imagined return over the horizon")
    points = sorted((r for r in rows if r.get("training_step") is not None), key=lambda r: r["training_step"])
    if points:
        steps = [r["training_step"] for r in points]
        axis.plot(steps, [r["real_return"] for r in points], marker="o", color="tab:blue", label="checkpoint: real return")
        axis.plot(steps, [r["imagined_return"] for r in points], marker="s", color="tab:red", label="checkpoint: imagined return")
    for name, style in (("oracle", ":"), ("random", "-.")):
        match = [r for r in rows if r["policy"] == name]
        if match:
            axis.axhline(match[0]["real_return"], color="grey", linestyle=style, linewidth=1, label=f"{name}: real return")
    axis.set_xlabel("agent update"), axis.set_ylabel("return")
    axis.set_title("Dreamer agent learning curve")
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return _figure_to_array(figure)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.3f}"
    return str(value)


def format_report(cfg: Any, headline: dict, rows: list[dict], gif_names: list[str], run_path: Path) -> str:
    """The run's ``report.md``: headline numbers, the per-policy table, plots and videos."""
    lines = [
        f"# Evaluation report: {cfg.env.id}",
        "",
        f"Run `{run_path}`; {headline['episodes']} episodes per policy from env seeds "
        f"{cfg.evaluate.seed}..{cfg.evaluate.seed + headline['episodes'] - 1}; imagined episodes start from the same "
        "first frames in the world model.",
        "",
    ]
    if not headline.get("trusted", True):
        lines += ["**Do not trust this run's imagined figures**: the world model and the real env disagree.", ""]
        lines += [f"- {flag}" for flag in headline["flags"]]
        lines += ["", "A score imagined but not obtained in the real env is a model error the agent found, not a "
                  "result. More data where the agent goes, or a larger model, are the usual remedies.", ""]
    elif headline.get("flags"):
        lines += ["The world model gets these imagined returns wrong (beyond `evaluate.trust_gap` and beyond "
                  "noise); the agent's figures are not among them:", ""]
        lines += [f"- {flag}" for flag in headline["flags"]] + [""]
    lines += [
        "## Headline",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for key in ("trusted", "normalized_score", "real_return", "imagined_return", "return_gap", *METRICS,
                "imagined_reward", "imagined_return_model", "return_gap_model", "spearman_model", "kendall_model",
                "imagined_return_step_aware", "return_gap_step_aware", "spearman_step_aware", "kendall_step_aware",
                "trust_gap_spearman", "num_policies", "random_return", "oracle_return"):
        if key in headline:
            interval = headline.get(f"{key}_ci")
            shown = _fmt(headline[key]) + (f" [{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else "")
            lines.append(f"| {key} | {shown} |")
    lines += [
        "",
        "`normalized_score` = (R - R_random) / (R_oracle - R_random) of the trained agent's real return; "
        "`return_gap` = |imagined - real| for it; `spearman`/`kendall`: rank agreement of imagined and real "
        "returns over all policies. The headline imagined return is the `imagined_reward` one. "
        "`*_step_aware`: each imagined success paid MiniGrid's reward for the step it happens at "
        "(1 - 0.9 t / max_steps); `*_model`: paid the reward head's value. The step count is not in a frame, "
        "so the head's value can only be an average over the data; success and its timing are the model's in both.",
        "",
        "Over the P policies, on the headline imagined return I and real return R (per-policy means), with "
        "[low, high] the 95% bootstrap interval over the episode seeds: `mae` = mean |I - R|, `mae_normalized` = "
        "mae / (R_oracle - R_random); `pearson`, `spearman`, `kendall` (tau-b) between I and R; `regret_at_k` = "
        "(max R - max R over imagination's top k) / (R_oracle - R_random) (ties in I broken against the model); "
        "`mmrv` = mean_i max_j |R_i - R_j| [(I_i < I_j) != (R_i < R_j)]; `success_calibration_error` = "
        "mean |imagined success rate - real success rate|. `model doubt / step`: the world model's mean "
        "doubt about each imagined step of the policy (the expected number of wrong tokens of its most likely "
        "frame, plus the reward and termination doubts); `trust_gap_spearman`: its rank correlation with the "
        "policies' gaps. See docs/evaluation.md.",
        "",
        "## Policies",
        "",
        "| policy | real return | imagined return | gap | imagined (model reward) | imagined (step-aware) | "
        "normalised score | real success | imagined success | real length | imagined length | success gap | "
        "model doubt / step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['policy']} | {_fmt(row['real_return'])} ± {_fmt(row['real_return_std'])} | "
            f"{_fmt(row['imagined_return'])} ± {_fmt(row['imagined_return_std'])} | {_fmt(row['return_gap'])} | "
            f"{_fmt(row.get('imagined_return_model'))} | {_fmt(row.get('imagined_return_step_aware'))} | "
            f"{_fmt(row['normalized_score'])} | {_fmt(row['real_success'])} | {_fmt(row['imagined_success'])} | "
            f"{_fmt(row['real_length'])} | {_fmt(row['imagined_length'])} | {_fmt(row.get('success_gap'))} | "
            f"{_fmt(row.get('uncertainty'))} |"
        )
    lines += ["", "## Plots", "", "![imagined vs real](media/evaluate_scatter.png)", "",
              "![learning curve](media/evaluate_learning_curve.png)", "", "## Rollouts (real | imagined)", ""]
    for name in gif_names:
        lines.append(f"- {name}: ![{name}](media/evaluate_{_slug(name)}_real_vs_imagined.gif)")
    return "\n".join(lines) + "\n"
