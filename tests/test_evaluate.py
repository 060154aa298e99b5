"""Evaluation: metrics on hand-computed cases, imagined rollouts on a toy model with known returns,
and the report's pieces."""

import math

import numpy as np
import pytest
import torch

from agents.evaluate import (
    Rollouts,
    format_report,
    learning_curve_plot,
    normalized_score,
    rank_agreement,
    reference_returns,
    run_imagined,
    run_real,
    scatter_plot,
    side_by_side,
)
from agents.policy import Policy, PolicyInput, make_policy
from agents.toy import FORWARD, LEFT, ToyCorridorModel


def test_normalized_score_hand_cases():
    assert normalized_score(0.9, random_return=0.1, oracle_return=0.9) == pytest.approx(1.0)
    assert normalized_score(0.1, random_return=0.1, oracle_return=0.9) == pytest.approx(0.0)
    assert normalized_score(0.5, random_return=0.1, oracle_return=0.9) == pytest.approx(0.5)
    assert normalized_score(0.0, random_return=0.1, oracle_return=0.9) == pytest.approx(-0.125)
    assert math.isnan(normalized_score(0.5, random_return=0.3, oracle_return=0.3))


def test_rank_agreement_hand_cases():
    assert rank_agreement([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx({"spearman": 1.0, "kendall": 1.0})
    assert rank_agreement([4, 3, 2, 1], [10, 20, 30, 40]) == pytest.approx({"spearman": -1.0, "kendall": -1.0})
    # One adjacent swap among 4: rho = 1 - 6 * 2 / (4 * 15) = 0.8; tau = (5 - 1) / 6
    swapped = rank_agreement([1, 3, 2, 4], [1, 2, 3, 4])
    assert swapped["spearman"] == pytest.approx(0.8)
    assert swapped["kendall"] == pytest.approx(4 / 6)
    # No ranking to agree with: nan, not a fake number.
    assert math.isnan(rank_agreement([1, 1, 1], [1, 2, 3])["spearman"])
    assert math.isnan(rank_agreement([1, 2], [1, 2])["kendall"])


class _Constant(Policy):
    """Always the same action; reads tokens like a learned policy."""

    inputs = ("tokens",)

    def __init__(self, action: int):
        super().__init__(f"always_{action}")
        self.action = action

    def act(self, inp: PolicyInput) -> np.ndarray:
        return np.full(inp.require("tokens", self.name).shape[0], self.action, dtype=np.int64)


def test_imagined_rollouts_follow_the_model_to_termination_or_step_limit():
    model = ToyCorridorModel(length=6)
    first_frames = model.tokenizer.decode(model.render(torch.tensor([0, 2, 4]))).numpy()
    first_states = np.zeros((3, 1), dtype=np.int64)
    forward = run_imagined(_Constant(FORWARD), model, first_frames, first_states, max_steps=20, policy_seed=0,
                           record_first=True)
    assert forward.returns.tolist() == [1.0, 1.0, 1.0]
    assert forward.lengths.tolist() == [5, 3, 1] and forward.success.all()
    assert forward.frames.shape == (6, 4, 24, 3)  # first frame + 5 imagined ones, decoded
    # MiniGrid's step-aware reward: success at step 5, 3, 1 of a 100-step episode pays 1 - 0.9 * t / 100.
    timed = run_imagined(_Constant(FORWARD), model, first_frames, first_states, max_steps=20, policy_seed=0,
                         env_max_steps=100)
    assert timed.returns_step_aware.tolist() == pytest.approx([0.955, 0.973, 0.991])
    left = run_imagined(_Constant(LEFT), model, first_frames, first_states, max_steps=20, policy_seed=0)
    assert left.returns.tolist() == [0.0, 0.0, 0.0] and left.lengths.tolist() == [20, 20, 20]


def test_real_rollouts_report_every_step_and_the_first_states():
    """run_real's on_step sees each live row's step, state before and after, in order; Rollouts
    carries the first states; without on_step the episodes are the same."""
    from envs.make import EnvConfig, make_env_from_config

    env_cfg, seeds = EnvConfig(id="MiniGrid-Empty-5x5-v0"), [3, 4]
    steps = []
    observed = run_real(make_policy("oracle"), env_cfg, seeds, None, 0,
                        on_step=lambda row, state, next_state: steps.append((row, state.copy(), next_state.copy())))
    plain = run_real(make_policy("oracle"), env_cfg, seeds, None, 0)
    assert observed.returns.tolist() == plain.returns.tolist() and observed.lengths.tolist() == plain.lengths.tolist()
    first = np.stack([make_env_from_config(env_cfg).reset(seed=s)[1]["state"] for s in seeds])
    assert np.array_equal(observed.first_states, first)
    for row in range(len(seeds)):
        chain = [(state, next_state) for r, state, next_state in steps if r == row]
        assert len(chain) == observed.lengths[row]
        assert np.array_equal(chain[0][0], first[row])
        assert all(np.array_equal(a[1], b[0]) for a, b in zip(chain, chain[1:]))  # each step starts where the last ended


def test_reference_returns_are_the_random_and_oracle_rows_real_returns():
    from envs.make import EnvConfig

    env_cfg, seeds = EnvConfig(id="MiniGrid-Empty-5x5-v0"), [0, 1, 2]
    reference = reference_returns(env_cfg, seeds, policy_seed=5)
    assert reference == {
        spec: float(run_real(make_policy(spec), env_cfg, seeds, None, 5).returns.mean()) for spec in ("random", "oracle")
    }
    assert 0.0 < reference["random"] < reference["oracle"]


def test_side_by_side_pads_the_shorter_rollout():
    real = np.zeros((3, 8, 10, 3), dtype=np.uint8)
    imagined = np.full((5, 8, 10, 3), 7, dtype=np.uint8)
    video = side_by_side(real, imagined, gap=2)
    assert video.shape == (5, 8, 22, 3)
    assert (video[:, :, :10] == 0).all() and (video[:, :, 12:] == 7).all()


def test_report_and_plots():
    rows = []
    for name, real, imagined, step in (("dreamer", 0.9, 0.92, 500), ("dreamer@250", 0.5, 0.6, 250),
                                       ("random", 0.05, 0.04, None), ("oracle", 0.96, 0.95, None)):
        rows.append({"policy": name, "training_step": step, "real_return": real, "real_return_std": 0.01,
                     "imagined_return": imagined, "imagined_return_std": 0.02, "real_success": 1.0,
                     "imagined_success": 1.0, "real_length": 10.0, "imagined_length": 11.0,
                     "return_gap": imagined - real, "normalized_score": normalized_score(real, 0.05, 0.96)})
    for image in (scatter_plot(rows), learning_curve_plot(rows, [{"step": 1, "imagined_return": 0.1}])):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0

    class _Cfg:
        class env:  # noqa: N801
            id = "MiniGrid-DoorKey-5x5-v0"

        class evaluate:  # noqa: N801
            seed = 100

    headline = {"episodes": 4, "normalized_score": 0.934, "spearman": 1.0, "kendall": 1.0, "num_policies": 4}
    report = format_report(_Cfg, headline, rows, ["dreamer"], "runs/x")
    assert "| normalized_score | 0.934 |" in report
    assert "| dreamer@250 | 0.500 ± 0.010 | 0.600 ± 0.020 | 0.100 | - |" in report
    assert "media/evaluate_dreamer_real_vs_imagined.gif" in report
    assert isinstance(Rollouts(np.zeros(1), np.zeros(1), np.zeros(1, bool)), Rollouts)
