"""The field's metrics of imagined vs real returns (agents/metrics.py): hand-computed cases, the
bootstrap's coverage on simulated data, degenerate policy sets, and their place in metrics.json."""

import json
import math

import numpy as np
import pytest
from scipy.stats import kendalltau, pearsonr, spearmanr

from agents.metrics import (
    METRICS,
    bootstrap_metrics,
    evaluation_metrics,
    kendall,
    mean_absolute_error,
    mmrv,
    pearson,
    policy_set_metrics,
    regret_at_k,
    spearman,
)

REAL = np.array([0.0, 0.2, 0.5, 0.9])  # policy 0 plays the random role, policy 3 the oracle's


def test_correlations_of_a_perfect_a_reversed_and_a_tied_ranking():
    imagined = REAL * 0.5 + 0.1  # same order, another scale
    assert float(spearman(imagined, REAL)) == pytest.approx(1.0)
    assert float(kendall(imagined, REAL)) == pytest.approx(1.0)
    assert float(pearson(imagined, REAL)) == pytest.approx(1.0)
    assert float(spearman(-imagined, REAL)) == pytest.approx(-1.0)
    assert float(kendall(-imagined, REAL)) == pytest.approx(-1.0)
    # One tie in imagination among 4: tau-b = (5 - 0) / sqrt(5 * 6); rho: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4)
    tied = np.array([0.0, 0.3, 0.3, 0.8])
    assert float(kendall(tied, REAL)) == pytest.approx(5 / math.sqrt(30))
    assert float(spearman(tied, REAL)) == pytest.approx(spearmanr(tied, REAL).statistic)
    assert float(spearman(tied, REAL)) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_correlations_match_scipy_on_random_lists_and_a_batch_at_once():
    rng = np.random.default_rng(0)
    imagined, real = rng.integers(0, 5, (50, 7)).astype(float), rng.integers(0, 5, (50, 7)).astype(float)
    keep = (np.ptp(imagined, axis=1) > 0) & (np.ptp(real, axis=1) > 0)
    imagined, real = imagined[keep], real[keep]
    batched = spearman(imagined, real), kendall(imagined, real), pearson(imagined, real)
    for row, (a, b) in enumerate(zip(imagined, real)):
        assert batched[0][row] == pytest.approx(spearmanr(a, b).statistic)
        assert batched[1][row] == pytest.approx(kendalltau(a, b).statistic)
        assert batched[2][row] == pytest.approx(pearsonr(a, b).statistic)


def test_mean_absolute_error_raw_and_normalised():
    imagined = REAL + np.array([0.1, -0.1, 0.0, -0.2])
    assert float(mean_absolute_error(imagined, REAL)) == pytest.approx(0.1)
    metrics = policy_set_metrics(imagined, REAL, np.zeros(4), np.zeros(4), random_index=0, oracle_index=3)
    assert float(metrics["mae_normalized"]) == pytest.approx(0.1 / 0.9)


def test_regret_of_a_perfect_a_worst_and_a_tied_ranking():
    assert float(regret_at_k(REAL, REAL, 1)) == 0.0
    assert float(regret_at_k(-REAL, REAL, 1)) == pytest.approx(0.9)  # picks the worst policy
    assert float(regret_at_k(-REAL, REAL, 3)) == pytest.approx(0.9 - 0.5)  # best of the 3 worst
    assert float(regret_at_k(-REAL, REAL, 4)) == 0.0 and float(regret_at_k(-REAL, REAL, 10)) == 0.0
    # Imagination ties the best and the worst at the top: the tie is broken against the model.
    assert float(regret_at_k(np.array([1.0, 0.0, 0.0, 1.0]), REAL, 1)) == pytest.approx(0.9)
    assert float(regret_at_k(np.array([1.0, 0.0, 0.0, 1.0]), REAL, 2)) == 0.0
    worst = policy_set_metrics(-REAL, REAL, np.zeros(4), np.zeros(4), random_index=0, oracle_index=3)
    assert float(worst["regret_at_1"]) == pytest.approx(1.0) and float(worst["regret_at_3"]) == pytest.approx(0.4 / 0.9)


def test_mmrv_of_a_perfect_ranking_is_zero_and_of_small_cases_the_hand_value():
    assert float(mmrv(REAL, REAL)) == 0.0
    assert float(mmrv(REAL * 3 - 1, REAL)) == 0.0  # only the order counts
    # Swap policies 1 and 2 (real 0.2, 0.5): each violates only with the other, |0.2 - 0.5| = 0.3;
    # policies 0 and 3 violate with nobody: MMRV = (0 + 0.3 + 0.3 + 0) / 4.
    assert float(mmrv(np.array([0.0, 0.5, 0.2, 0.9]), REAL)) == pytest.approx(0.15)
    # Reversed: policy i's largest violation is to the farthest policy: (0.9, 0.7, 0.5, 0.9) / 4.
    assert float(mmrv(-REAL, REAL)) == pytest.approx((0.9 + 0.7 + 0.5 + 0.9) / 4)
    # A tie in imagination of policies 2 and 3: a violation for policy 2 (0.4), none for policy 3's side.
    assert float(mmrv(np.array([0.0, 0.2, 0.7, 0.7]), REAL)) == pytest.approx(0.4 / 4)


def test_bootstrap_interval_covers_the_true_value_at_about_its_nominal_rate():
    """200 simulated evaluations with known means: the 95% intervals of mae and pearson cover the
    truth in 88-99% of them. Imagination overestimates every policy's return by 0.2 plus
    noise, so mae's true value is 0.2, far from the kink of |.| at 0."""
    rng = np.random.default_rng(1)
    true_real = np.linspace(0.0, 0.9, 6)
    true_imagined = true_real + 0.2
    covered = []
    for _ in range(200):
        real = true_real[:, None] + rng.normal(0, 0.3, (6, 20))
        imagined = true_imagined[:, None] + rng.normal(0, 0.3, (6, 20))
        success = np.zeros((6, 20))
        interval = bootstrap_metrics(imagined, real, success, success, 0, 5, num_resamples=500,
                                     seed=int(rng.integers(2**31)))["mae"]
        covered.append(interval[0] <= 0.2 <= interval[1])
    assert 0.88 <= np.mean(covered) <= 0.99, np.mean(covered)


def test_bootstrap_is_seeded_and_its_intervals_hold_the_point_value():
    rng = np.random.default_rng(2)
    real = np.linspace(0, 1, 5)[:, None] + rng.normal(0, 0.2, (5, 20))
    imagined = real + rng.normal(0.05, 0.1, (5, 20))
    success_real, success_imagined = real > 0.5, imagined > 0.5
    first = evaluation_metrics(imagined, real, success_imagined, success_real, 0, 4, num_resamples=300, seed=7)
    again = evaluation_metrics(imagined, real, success_imagined, success_real, 0, 4, num_resamples=300, seed=7)
    other = evaluation_metrics(imagined, real, success_imagined, success_real, 0, 4, num_resamples=300, seed=8)
    assert first == again and first["mae_ci"] != other["mae_ci"]
    assert set(first) == set(METRICS) | {f"{name}_ci" for name in METRICS}
    for name in ("mae", "pearson", "spearman", "success_calibration_error"):
        low, high = first[f"{name}_ci"]
        assert low <= first[name] <= high, name
    assert first["success_calibration_error"] == pytest.approx(np.abs(success_imagined.mean(1) - success_real.mean(1)).mean())


def test_degenerate_policy_sets_give_nan_or_a_defined_value_and_valid_json():
    from agents.evaluate import _json_value

    one = evaluation_metrics(np.ones((1, 5)), np.ones((1, 5)), np.ones((1, 5)), np.ones((1, 5)), 0, 0,
                             num_resamples=100, seed=0)
    assert one["mae"] == 0.0 and one["mmrv"] == 0.0 and one["success_calibration_error"] == 0.0
    for name in ("spearman", "kendall", "pearson", "mae_normalized", "regret_at_1"):
        assert math.isnan(one[name]) and all(math.isnan(v) for v in one[f"{name}_ci"]), name
    equal = evaluation_metrics(np.full((4, 3), 0.5), np.full((4, 3), 0.5), np.zeros((4, 3)), np.zeros((4, 3)), 0, 3,
                               num_resamples=100, seed=0)
    assert equal["mae"] == 0.0 and equal["mmrv"] == 0.0 and math.isnan(equal["spearman"])
    assert math.isnan(equal["regret_at_1"])  # R_oracle = R_random: nothing to normalise by
    text = json.dumps({k: _json_value(v) for k, v in (one | equal).items()}, allow_nan=False)
    assert json.loads(text)["spearman_ci"] == [None, None]


def test_bootstrap_of_thirteen_policies_is_fast():
    import time

    rng = np.random.default_rng(3)
    data = [rng.random((13, 20)) for _ in range(4)]
    started = time.perf_counter()
    evaluation_metrics(*data, 0, 12, num_resamples=1000, seed=0)
    assert time.perf_counter() - started < 1.0


def test_report_headline_shows_each_metric_with_its_interval():
    from agents.evaluate import format_report

    class _Cfg:
        class env:  # noqa: N801
            id = "MiniGrid-DoorKey-5x5-v0"

        class evaluate:  # noqa: N801
            seed = 100

    headline = {"episodes": 4, "num_policies": 4, "mmrv": 0.15, "mmrv_ci": [0.1, 0.2],
                "spearman": float("nan"), "spearman_ci": [float("nan"), float("nan")]}
    report = format_report(_Cfg, headline, [], [], "runs/x")
    assert "| mmrv | 0.150 [0.100, 0.200] |" in report
    assert "| spearman | nan [nan, nan] |" in report
    assert "`mmrv` = mean_i max_j |R_i - R_j|" in report  # the line of definitions
