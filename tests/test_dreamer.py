"""The Dreamer-style agent: returns and normalisation against hand-computed cases, the update on a
toy world model whose answer is known, the policy interface and its checkpoints."""

import numpy as np
import pytest
import torch

from agents.dreamer import (
    DreamerAgent,
    DreamerConfig,
    DreamerPolicy,
    ReturnNormalizer,
    alive_weights,
    imagine,
    kl_divergence,
    lambda_returns,
    pmpo_loss,
    reinforce_loss,
)
from agents.policy import PolicyInput, ScriptedPolicy, load_policy, make_policy, save_policy
from agents.toy import FORWARD, ToyCorridorModel
from agents.train_dreamer import StartFrames, imagination_update, optimizer_for
from common.atomic import ArtifactError, atomic_torch_save

torch.set_num_threads(1)


# ---------------------------------------------------------------- λ-returns and weights


def test_lambda_returns_hand_computed():
    # γ = λ = 0.5; rewards r0 = 1, r1 = 2; values v0 = 0, v1 = 10, v2 = 20 (v2 bootstraps).
    # R1 = 2 + 0.5 * (0.5 * 20 + 0.5 * 20) = 12;  R0 = 1 + 0.5 * (0.5 * 10 + 0.5 * 12) = 6.5
    rewards = torch.tensor([[1.0], [2.0]])
    values = torch.tensor([[0.0], [10.0], [20.0]])
    returns = lambda_returns(rewards, torch.ones(2, 1), values, discount=0.5, lambda_=0.5)
    assert returns[:, 0].tolist() == pytest.approx([6.5, 12.0])
    # Termination after the second action: nothing is bootstrapped past it.
    # R1 = 2;  R0 = 1 + 0.5 * (0.5 * 10 + 0.5 * 2) = 4
    returns = lambda_returns(rewards, torch.tensor([[1.0], [0.0]]), values, discount=0.5, lambda_=0.5)
    assert returns[:, 0].tolist() == pytest.approx([4.0, 2.0])


def test_lambda_returns_limits():
    rewards = torch.tensor([[1.0], [0.0], [3.0]])
    values = torch.tensor([[5.0], [6.0], [7.0], [8.0]])
    continues = torch.ones(3, 1)
    td0 = lambda_returns(rewards, continues, values, discount=0.9, lambda_=0.0)  # r_t + γ v_{t+1}
    assert td0[:, 0].tolist() == pytest.approx([1 + 0.9 * 6, 0 + 0.9 * 7, 3 + 0.9 * 8])
    monte_carlo = lambda_returns(rewards, continues, values, discount=0.9, lambda_=1.0)
    assert monte_carlo[0, 0].item() == pytest.approx(1 + 0.9 * 0 + 0.81 * 3 + 0.729 * 8)


def test_alive_weights_stop_after_termination():
    continues = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert alive_weights(continues).tolist() == [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]


# ---------------------------------------------------------------- return normalisation


def test_return_normalizer_percentile_range_hand_computed():
    norm = ReturnNormalizer(decay=0.5, low=0.05, high=0.95, floor=1.0)
    returns = torch.arange(101, dtype=torch.float32)  # 5th percentile 5, 95th percentile 95
    norm.update(returns)
    assert (norm.low.item(), norm.high.item()) == pytest.approx((2.5, 47.5))  # EMAs start at 0
    assert norm.scale().item() == pytest.approx(45.0)
    norm.update(returns)
    assert norm.scale().item() == pytest.approx(71.25 - 3.75)


def test_return_normalizer_floor_and_masked_entries():
    norm = ReturnNormalizer(decay=0.0, floor=1.0)
    norm.update(torch.tensor([0.0, 0.1, 0.2, 0.3]))
    assert norm.scale().item() == pytest.approx(1.0)  # small returns are not amplified
    norm = ReturnNormalizer(decay=0.0, floor=0.0)
    norm.update(torch.tensor([0.0, 10.0, 1000.0]), weights=torch.tensor([1.0, 1.0, 0.0]))  # 1000 is past the end
    assert norm.high.item() == pytest.approx(9.5)


# ---------------------------------------------------------------- actor losses


def test_pmpo_uses_only_the_sign_of_the_advantage():
    log_probs = torch.tensor([-1.0, -2.0, -3.0])
    weights = torch.ones(3)
    # alpha * mean over D+ of -log p  +  (1 - alpha) * mean over D- of log p = 0.5 * 1 + 0.5 * (-2) = -0.5
    assert pmpo_loss(log_probs, torch.tensor([1.0, -1.0, 0.0]), weights, alpha=0.5).item() == pytest.approx(-0.5)
    assert pmpo_loss(log_probs, torch.tensor([100.0, -0.01, 0.0]), weights, alpha=0.5).item() == pytest.approx(-0.5)
    # REINFORCE, by contrast, scales with the advantage.
    assert reinforce_loss(log_probs, torch.tensor([2.0, 0.0, 0.0]), weights).item() == pytest.approx(2.0 / 3.0)


def test_kl_divergence_is_zero_for_equal_policies_and_positive_otherwise():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    assert kl_divergence(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_divergence(logits, torch.zeros_like(logits)).item() > 0


# ---------------------------------------------------------------- learning on a toy world model


def _toy_return(agent, model, starts, horizon, seed=1):
    generator = torch.Generator().manual_seed(seed)
    trajectory = imagine(model, agent.actor, model.start_tokens(starts), torch.zeros(len(starts), 0, dtype=torch.long),
                         horizon, generator)
    return float((trajectory.rewards * alive_weights(trajectory.continues)).sum(0).mean())


@pytest.mark.parametrize("actor_update,extra", [("reinforce", {}), ("pmpo", {"prior_kl_coef": 0.02})])
def test_update_improves_imagined_return_on_toy_corridor(actor_update, extra):
    """The corridor's answer is known: always forward reaches the goal (return 1) within the horizon."""
    torch.manual_seed(0)
    model = ToyCorridorModel(length=6)
    cfg = DreamerConfig(horizon=10, batch_size=64, hidden_dim=32, channels=8, actor_lr=1e-3, critic_lr=1e-3,
                        entropy_coef=3e-3, actor_update=actor_update,
                        **extra)
    agent = DreamerAgent(cfg, model.vocab_size, (1, model.length))
    optimizer = optimizer_for(agent, cfg)
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    from_start = torch.zeros(256, dtype=torch.long)
    before = _toy_return(agent, model, from_start, cfg.horizon)
    for _ in range(150):
        starts = torch.as_tensor(rng.integers(0, model.length - 1, size=cfg.batch_size))
        context = (model.start_tokens(starts), torch.zeros(cfg.batch_size, 0, dtype=torch.long))
        imagination_update(agent, optimizer, model, context, generator)
    after = _toy_return(agent, model, from_start, cfg.horizon)
    assert before < 0.5  # a uniform policy rarely walks 5 tiles right in 10 steps
    assert after > 0.9 and after > before + 0.4
    probs = torch.softmax(agent.actor(model.start_tokens(torch.arange(5))[:, 0]), -1)
    assert (probs[:, FORWARD] > 0.7).all()  # it learned the known answer, everywhere


# ---------------------------------------------------------------- start frames


class _FakeDataset:
    """Two episodes: 3 steps (4 frames) and 1 step (2 frames)."""

    num_frames = 6
    episode_starts = np.array([0, 4])
    episode_lengths = np.array([3, 1])
    actions = np.array([2, 0, 1, -1, 5, -1])


def test_start_frames_exclude_last_frames_and_short_contexts():
    tokens = np.arange(6)[:, None, None].repeat(2, 1).repeat(2, 2)
    assert StartFrames.from_dataset(_FakeDataset(), tokens, context_length=1).index.tolist() == [0, 1, 2, 4]
    starts = StartFrames.from_dataset(_FakeDataset(), tokens, context_length=2)
    assert starts.index.tolist() == [1, 2]
    context_tokens, context_actions = starts.sample(np.random.default_rng(0), 8)
    assert context_tokens.shape == (8, 2, 2, 2) and context_actions.shape == (8, 1)
    for frames, action in zip(context_tokens[:, :, 0, 0].tolist(), context_actions[:, 0].tolist()):
        assert frames[1] == frames[0] + 1 and action == _FakeDataset.actions[frames[0]]


class _RewardedDataset:
    """Two episodes of 4 steps; the first is rewarded at its last step (frame 3 -> 4)."""

    num_frames = 10
    episode_starts = np.array([0, 5])
    episode_lengths = np.array([4, 4])
    actions = np.array([2, 2, 2, 2, -1, 2, 2, 2, 2, -1])
    rewards = np.array([0, 0, 0, 0.8, 0, 0, 0, 0, 0, 0])


def test_near_reward_starts_come_from_the_stretch_before_a_reward():
    tokens = np.arange(10)[:, None, None].repeat(2, 1).repeat(2, 2)
    starts = StartFrames.from_dataset(_RewardedDataset(), tokens, context_length=1, reward_window=2)
    assert starts.near_reward.tolist() == [2, 3]  # the reward is collected within 2 steps of these
    assert StartFrames.from_dataset(_RewardedDataset(), tokens, 1, reward_window=10).near_reward.tolist() == [0, 1, 2, 3]
    context, _ = starts.sample(np.random.default_rng(0), 8, near_reward_fraction=0.5)
    first = context[:, 0, 0, 0].tolist()
    assert all(f in (2, 3) for f in first[:4]) and all(f in starts.index.tolist() for f in first)
    plain = StartFrames.from_dataset(_RewardedDataset(), tokens, context_length=1)
    assert len(plain.near_reward) == 0
    assert plain.sample(np.random.default_rng(0), 8, near_reward_fraction=0.5)[0].shape == (8, 1, 2, 2)


# ---------------------------------------------------------------- the policy interface


def test_dreamer_policy_checkpoint_round_trip(tmp_path):
    cfg = DreamerConfig(hidden_dim=16, channels=4, embed_dim=4)
    agent = DreamerAgent(cfg, vocab_size=5, grid_shape=(3, 4))
    policy = DreamerPolicy(agent.actor, cfg, (3, 4), tokenizer_identity="tok-1", env_id="MiniGrid-Empty-5x5-v0")
    path = save_policy(tmp_path / "agent.pt", policy)
    loaded = load_policy(path)
    assert isinstance(loaded, DreamerPolicy) and loaded.tokenizer_identity == "tok-1"
    tokens = np.random.default_rng(0).integers(0, 5, size=(16, 3, 4))
    policy.reset(16, seed=3)
    loaded.reset(16, seed=3)
    assert np.array_equal(policy.act(PolicyInput(tokens=tokens)), loaded.act(PolicyInput(tokens=tokens)))
    with pytest.raises(ValueError, match="token grids"):
        loaded.act(PolicyInput(tokens=tokens[:, :2]))
    with pytest.raises(ValueError, match="acts on tokens"):
        loaded.act(PolicyInput(states=np.zeros((16, 81))))


def test_load_policy_fails_clearly(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        load_policy(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ArtifactError, match="no 'kind'"):
        load_policy(tmp_path / "foreign.pt")
    torch.save({"kind": "scripted"}, tmp_path / "unhashed.pt")
    with pytest.raises(ArtifactError, match="no weights hash"):
        load_policy(tmp_path / "unhashed.pt")
    atomic_torch_save(tmp_path / "unknown.pt", {"kind": "no_such_agent"})
    with pytest.raises(ValueError, match="unknown policy kind 'no_such_agent'"):
        load_policy(tmp_path / "unknown.pt")


def test_scripted_policies_in_the_real_env():
    from envs.make import make_env

    env = make_env("MiniGrid-DoorKey-5x5-v0")
    returns = {}
    for spec in ("oracle", "random"):
        policy = make_policy(spec)
        assert isinstance(policy, ScriptedPolicy) and policy.inputs == ("states",)
        frame, info = env.reset(seed=7)
        policy.reset(1, seed=0)
        total, done = 0.0, False
        while not done:
            frame, reward, terminated, truncated, info = env.step(int(policy.act(PolicyInput(states=info["state"][None]))[0]))
            total, done = total + reward, terminated or truncated
        returns[spec] = total
    assert returns["oracle"] > 0.9 > returns["random"]
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("clever")
    # An impossible (predicted) state is answered with a random action, not a crash.
    oracle = make_policy("oracle")
    oracle.reset(2, seed=0)
    actions = oracle.act(PolicyInput(states=np.zeros((2, 81), dtype=np.int64)))
    assert actions.shape == (2,) and ((0 <= actions) & (actions < 7)).all()


def test_entropy_weight_decays_linearly():
    agent = DreamerAgent(DreamerConfig(entropy_coef=0.01, entropy_coef_final=0.001, hidden_dim=8, channels=2, embed_dim=2),
                         vocab_size=3, grid_shape=(1, 3))
    assert [agent.entropy_coef(p) for p in (0.0, 0.5, 1.0, 2.0)] == pytest.approx([0.01, 0.0055, 0.001, 0.001])


class _LyingCorridor(ToyCorridorModel):
    """The corridor, except that the model pays a success for "left" at the left wall, where the
    real corridor pays nothing: a model error one step away, against the real goal five steps away.
    The model is unsure of exactly that transition (doubt 1, else 0)."""

    def _lie(self, actions: torch.Tensor) -> torch.Tensor:
        return (self.position == 0) & (torch.as_tensor(actions) == 0)

    def uncertainty(self, actions: torch.Tensor) -> torch.Tensor:
        return self._lie(actions).float()

    def step(self, actions: torch.Tensor):
        lie = self._lie(actions)
        step = super().step(actions)
        step.reward = torch.where(lie, torch.ones_like(step.reward), step.reward)
        step.terminated = step.terminated | lie
        return step


@pytest.mark.parametrize("penalty", [0.0, 2.0])
def test_doubt_penalty_keeps_the_agent_off_a_model_error(penalty):
    torch.manual_seed(0)
    model = _LyingCorridor(length=6)
    cfg = DreamerConfig(horizon=6, batch_size=32, hidden_dim=16, channels=4, actor_lr=3e-3, critic_lr=3e-3,
                        entropy_coef=3e-3, doubt_penalty=penalty)
    agent = DreamerAgent(cfg, model.vocab_size, (1, model.length))
    optimizer = optimizer_for(agent, cfg)
    generator = torch.Generator().manual_seed(0)
    starts = torch.zeros(cfg.batch_size, dtype=torch.long)
    for _ in range(60):
        losses = imagination_update(agent, optimizer, model, (model.start_tokens(starts), torch.zeros(cfg.batch_size, 0, dtype=torch.long)), generator)
    probs = torch.softmax(agent.actor(model.start_tokens(torch.zeros(1, dtype=torch.long))[:, 0]), -1)[0]
    if penalty == 0:  # the unpenalised agent takes the model's free reward
        assert probs[0] > 0.6 and "imagined_doubt" not in losses.parts
    else:
        assert probs[0] < 0.1 and losses.parts["imagined_doubt"] < 0.05  # off the error (seeds 0-2: p(left) <= 0.001)


# ---------------------------------------------------------------- the agent benchmark's pure parts


def test_agent_benchmark_score_interval_and_ladder():
    from benchmarks.agent import rungs, score_interval

    same = {"dreamer": [0.5] * 4, "random": [0.0] * 4, "oracle": [1.0] * 4}
    assert score_interval([same, same], resamples=50) == [0.5, 0.5]  # no spread, no width
    spread = [{"dreamer": [0.9, 0.1], "random": [0.0, 0.0], "oracle": [1.0, 1.0]},
              {"dreamer": [1.0, 1.0], "random": [0.0, 0.0], "oracle": [1.0, 1.0]}]
    low, high = score_interval(spread, resamples=400)
    assert 0.05 <= low < 0.75 < high <= 1.0  # around the mean 0.75, within what the episodes allow
    assert rungs(None, 10_000) == [2_000, 5_000, 10_000] and rungs(20_000, 50_000) == [20_000, 50_000]
    with pytest.raises(SystemExit, match="not a ladder rung"):
        rungs(3_000, 200_000)
