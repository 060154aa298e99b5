"""PPO baseline: it learns a tiny corridor, its checkpoint loads through load_policy and acts as
trained, the env's action count sets its head, and its stage validates, runs and skips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.policy import PolicyInput, load_policy, save_policy
from agents.ppo import PPOConfig, PPOPolicy, check_config, linear_schedule


def _config(run_root, name: str, *overrides: str):
    from common.config import load_config
    from scripts.config import Config

    return load_config(Config, [f"run.root={run_root}", f"run.name={name}", "run.progress=false", *overrides])


def _tile_table(env_id: str, steps: int = 300):
    """An exact tokenizer of every tile a random walk in ``env_id`` shows (each tile one token)."""
    from agents.toy import TileTable
    from envs.make import make_env

    env = make_env(env_id)
    frames, rng = [env.reset(seed=0)[0]], np.random.default_rng(0)
    for _ in range(steps):
        frame, _, terminated, truncated, _ = env.step(int(rng.integers(3)))
        frames.append(frame)
        if terminated or truncated:
            frames.append(env.reset()[0])
    return TileTable.from_frames(np.stack(frames), tile_size=8)


def _write_untrained_tokenizer(folder) -> None:
    """A valid ``tokenizer.pt`` (untrained weights): enough for the stage's plumbing, not for learning."""
    from common.atomic import atomic_torch_save
    from worldmodel.tokenizer import Tokenizer, tokenizer_checkpoint
    from worldmodel.train_tokenizer import TokenizerStageConfig, model_config

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(folder / "tokenizer.pt", tokenizer_checkpoint(Tokenizer(model_config(TokenizerStageConfig(), 8))))


def test_config_checks_name_their_key():
    check_config(PPOConfig())
    with pytest.raises(ValueError, match="ppo.minibatches"):
        check_config(PPOConfig(num_envs=3, rollout_steps=5, minibatches=2))
    with pytest.raises(ValueError, match="ppo.lr_final"):
        check_config(PPOConfig(lr=1e-4, lr_final=1e-3))
    assert linear_schedule(1.0, 0.0, 0.25) == pytest.approx(0.75) and linear_schedule(1.0, 0.0, 2.0) == 0.0


def test_ppo_learns_the_empty_corridor_and_its_checkpoint_acts_as_trained(run_root):
    """Empty-5x5 (goal two tiles right and two down: 5 steps for the oracle) within 50 steps, on a
    fixed seed: from a near-uniform policy (normalised score about 0) to above 0.5 in 4k real steps
    (0.97 on this seed, 0.83-1.00 on seeds 1-3)."""
    from agents.evaluate import run_real
    from agents.train_ppo import FINAL_NAME, train

    cfg = _config(run_root, "learn", "env.id=MiniGrid-Empty-5x5-v0", "env.max_steps=50", "ppo.total_env_steps=4096",
                  "ppo.rollout_steps=16", "ppo.minibatches=2", "ppo.epochs=4", "ppo.lr=0.003", "ppo.lr_final=0.001",
                  "ppo.embed_dim=8", "ppo.channels=16", "ppo.hidden_dim=64", "ppo.eval_every=0", "ppo.eval_episodes=16")
    tokenizer = _tile_table("MiniGrid-Empty-5x5-v0")
    metrics = train(cfg, None, tokenizer=tokenizer, log=lambda message: None)
    assert metrics["env_steps"] == 4096 and metrics["oracle_return"] > metrics["random_return"]
    assert metrics["normalized_score"] >= 0.5, metrics

    policy = load_policy(run_root / "learn" / FINAL_NAME)
    assert isinstance(policy, PPOPolicy) and policy.tokenizer_identity == tokenizer.identity
    seeds = [int(cfg.evaluate.seed) + i for i in range(16)]
    replay = run_real(policy, cfg.env, seeds, tokenizer, policy_seed=int(cfg.evaluate.seed))
    assert replay.returns.mean() == pytest.approx(metrics["real_return"])  # the saved actor is the trained one
    actions = policy.act(PolicyInput(tokens=tokenizer.encode(_first_frame(cfg)[None])))
    assert actions.dtype == np.int64 and actions.shape == (1,) and 0 <= actions[0] < 7


def _first_frame(cfg):
    from envs.make import make_env_from_config

    return make_env_from_config(cfg.env).reset(seed=int(cfg.evaluate.seed))[0]


def test_stage_runs_skips_when_complete_and_takes_the_env_action_count(run_root, capsys):
    """Dynamic-Obstacles has 3 actions: the head has 3 logits; a second call finds the stage complete."""
    from scripts.train_ppo import main

    folder = run_root / "stage"
    _write_untrained_tokenizer(folder)
    argv = ["--env", "dynamic-obstacles-6x6", f"run.root={run_root}", "run.name=stage", "run.progress=false",
            "ppo.total_env_steps=32", "ppo.num_envs=2", "ppo.rollout_steps=16", "ppo.epochs=1", "ppo.minibatches=1",
            "ppo.eval_episodes=2", "ppo.embed_dim=4", "ppo.channels=4", "ppo.hidden_dim=16"]
    metrics = main(argv)
    assert metrics["env_steps"] == 32
    checkpoint = torch.load(folder / "ppo.pt", weights_only=False)
    assert checkpoint["num_actions"] == 3 and checkpoint["actor"]["head.2.weight"].shape[0] == 3
    assert load_policy(folder / "ppo.pt").logits(np.zeros((2, 6, 6), dtype=np.int64)).shape == (2, 3)
    written = (folder / "ppo.pt").stat().st_mtime_ns
    capsys.readouterr()
    main(argv)
    assert "[ppo] complete" in capsys.readouterr().out and (folder / "ppo.pt").stat().st_mtime_ns == written


def test_policies_along_training_are_saved_at_each_evaluation_and_evaluated_by_name(run_root):
    """Every ``eval_every`` updates the policy is saved under ppo_checkpoints/ with its evaluation;
    ``ppo`` and ``ppo_checkpoints`` name them in evaluate.policies; a fresh start drops a killed run's."""
    from agents.evaluate import resolve_policies
    from agents.train_ppo import CHECKPOINT_FOLDER, checkpoints_along_training
    from scripts.stages import policy_ids
    from scripts.train_ppo import main

    folder = run_root / "along"
    _write_untrained_tokenizer(folder)
    stale = folder / CHECKPOINT_FOLDER / "step_000099.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"a killed run's policy")
    argv = [f"run.root={run_root}", "run.name=along", "run.progress=false", "ppo.total_env_steps=96", "ppo.num_envs=2",
            "ppo.rollout_steps=16", "ppo.epochs=1", "ppo.minibatches=1", "ppo.eval_every=1", "ppo.eval_episodes=2",
            "ppo.embed_dim=4", "ppo.channels=4", "ppo.hidden_dim=16"]
    main(argv)
    paths = checkpoints_along_training(folder)
    assert [p.name for p in paths] == ["step_000001.pt", "step_000002.pt"] and not stale.exists()
    history = torch.load(folder / "ppo.pt", weights_only=False)["history"]
    assert [torch.load(p, weights_only=False)["metrics"] for p in paths] == history[:2]

    policies = resolve_policies("ppo,ppo_checkpoints,random", folder, "MiniGrid-DoorKey-5x5-v0", max_checkpoints=6)
    assert [p.name for p in policies] == ["ppo", "ppo@32", "ppo@64", "random"]
    assert [p.training_step for p in policies[:3]] == [3, 1, 2]
    assert [p.name for p in resolve_policies("ppo_checkpoints", folder, "x", max_checkpoints=1)] == ["ppo@64"]
    cfg = _config(run_root, "along", "evaluate.policies=ppo,random,oracle")
    before = policy_ids(cfg)["ppo"]
    changed = load_policy(paths[0])
    with torch.no_grad():
        next(changed.actor.parameters()).add_(1.0)
    save_policy(paths[0], changed)
    assert policy_ids(cfg)["ppo"] != before  # a changed checkpoint along training reruns the evaluation


@pytest.mark.parametrize("override, key", [("ppo.minibatches=3", "ppo.minibatches"), ("ppo.lr=0", "ppo.lr"),
                                           ("ppo.act_mode=argmax", "ppo.act_mode")])
def test_bad_value_exits_2_naming_the_key(run_root, capsys, override, key):
    from scripts.train_ppo import main

    with pytest.raises(SystemExit) as exit_info:
        main([f"run.root={run_root}", "run.name=bad", override])
    assert exit_info.value.code == 2 and key in capsys.readouterr().err
    assert not (run_root / "bad").exists()


def test_the_sandbox_command_has_train_ppo():
    from scripts.cli import COMMANDS

    assert COMMANDS["train-ppo"][0] == "train_ppo"


def test_without_a_tokenizer_the_stage_fails_naming_the_file(run_root, capsys):
    from scripts.train_ppo import main

    with pytest.raises(SystemExit) as exit_info:
        main([f"run.root={run_root}", "run.name=none", "run.progress=false"])
    assert exit_info.value.code == 1 and "tokenizer.pt" in capsys.readouterr().err
    assert not (run_root / "none" / "ppo.pt").exists()
