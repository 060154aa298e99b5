"""How well imagined returns stand in for real ones, in the field's metrics (pure numpy/scipy, no I/O).

The off-policy evaluation benchmark DOPE (Fu et al., 2021) scores a value estimator by its absolute
error, its rank correlation and its regret@k; SIMPLER (Li et al., 2024) scores a simulator by its
Pearson correlation and its mean maximum rank violation (MMRV). Here the estimator is the world
model: ``imagined`` is each policy's mean imagined return, ``real`` its mean real return.

Every metric takes per-policy values with the policies on the last axis, ``(..., P)``, and returns
``(...)``: one call scores a whole batch of bootstrap resamples at once. :func:`bootstrap_metrics`
resamples the episodes; :func:`evaluation_metrics` gives the point values, their 95% intervals
(``<metric>_ci``) and the per-policy success calibration. Definitions: ``docs/evaluation.md``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MIN_POLICIES_TO_RANK = 3
"""Fewer policies than this: no correlation (nan), as two points always correlate perfectly."""

METRICS = ("mae", "mae_normalized", "spearman", "kendall", "pearson", "regret_at_1", "regret_at_3", "mmrv",
           "success_calibration_error")
"""The names :func:`policy_set_metrics` returns, in report order."""


# ---------------------------------------------------------------------------------------------
# Metrics of one policy set: (..., P) -> (...)
# ---------------------------------------------------------------------------------------------


def mean_absolute_error(imagined: np.ndarray, real: np.ndarray) -> np.ndarray:
    """``mean_i |imagined_i - real_i|`` over the policies: (..., P) -> (...)."""
    return np.abs(np.asarray(imagined, float) - np.asarray(real, float)).mean(axis=-1)


def _rankable(imagined: np.ndarray, real: np.ndarray) -> np.ndarray:
    """(...) bool: enough policies, and neither list constant (else there is no ranking to agree with)."""
    enough = imagined.shape[-1] >= MIN_POLICIES_TO_RANK
    return enough & (np.ptp(imagined, axis=-1) > 0) & (np.ptp(real, axis=-1) > 0)


def pearson(imagined: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Pearson's r between imagined and real values (SIMPLER's linear agreement): (..., P) -> (...).

    nan with fewer than 3 policies or a constant list.
    """
    imagined, real = np.asarray(imagined, float), np.asarray(real, float)
    ok = _rankable(imagined, real)
    x = imagined - imagined.mean(axis=-1, keepdims=True)
    y = real - real.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x * y).sum(axis=-1) / np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))
    return np.where(ok, np.clip(r, -1.0, 1.0), np.nan)


def spearman(imagined: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Spearman's rho: Pearson's r of the ranks (ties get their mean rank): (..., P) -> (...)."""
    from scipy.stats import rankdata

    imagined, real = np.asarray(imagined, float), np.asarray(real, float)
    ok = _rankable(imagined, real)
    return np.where(ok, pearson(rankdata(imagined, axis=-1), rankdata(real, axis=-1)), np.nan)


def kendall(imagined: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Kendall's tau-b, ties handled: ``sum_{i<j} s_ij t_ij / sqrt(sum s_ij^2 * sum t_ij^2)`` with
    ``s_ij = sign(imagined_i - imagined_j)``, ``t_ij = sign(real_i - real_j)``: (..., P) -> (...)."""
    imagined, real = np.asarray(imagined, float), np.asarray(real, float)
    ok = _rankable(imagined, real)
    s = np.sign(imagined[..., :, None] - imagined[..., None, :])  # (..., P, P), each pair twice
    t = np.sign(real[..., :, None] - real[..., None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = (s * t).sum(axis=(-2, -1)) / np.sqrt((s * s).sum(axis=(-2, -1)) * (t * t).sum(axis=(-2, -1)))
    return np.where(ok, np.clip(tau, -1.0, 1.0), np.nan)


def rank_agreement(imagined: Sequence[float], real: Sequence[float]) -> dict[str, float]:
    """Spearman's rho and Kendall's tau-b between two score lists (P,), as plain floats.

    nan when fewer than 3 policies or one list is constant (no ranking to agree with).
    """
    return {"spearman": float(spearman(imagined, real)), "kendall": float(kendall(imagined, real))}


def regret_at_k(imagined: np.ndarray, real: np.ndarray, k: int) -> np.ndarray:
    """DOPE's regret@k, unnormalised: ``max_i real_i - max_{i in top_k(imagined)} real_i``: (..., P) -> (...).

    ``top_k(imagined)``: the k policies imagination ranks highest (all of them when k >= P). Ties in
    imagination are broken against the model (the tied policy with the lower real value is picked
    first): a model that cannot tell policies apart gets no credit for a lucky order. 0 when
    imagination's top k hold the best real policy.
    """
    imagined, real = np.asarray(imagined, float), np.asarray(real, float)
    order = np.lexsort((real, -imagined), axis=-1)  # by imagined descending, then real ascending
    top = np.take_along_axis(real, order[..., : max(1, min(int(k), real.shape[-1]))], axis=-1)
    return real.max(axis=-1) - top.max(axis=-1)


def mmrv(imagined: np.ndarray, real: np.ndarray) -> np.ndarray:
    """SIMPLER's mean maximum rank violation: (..., P) -> (...).

    ``MMRV = (1/P) sum_i max_j |real_i - real_j| * 1[(imagined_i < imagined_j) != (real_i < real_j)]``:
    for each policy, the largest real-return gap to a policy that imagination orders the other way
    round, averaged over policies. 0 for an order-preserving model; a swap of two policies whose real
    values are close costs little, of two far apart a lot. A tie in imagination between policies of
    different real value counts as a violation (for the one of lower real value).
    """
    imagined, real = np.asarray(imagined, float), np.asarray(real, float)
    disagree = (imagined[..., :, None] < imagined[..., None, :]) != (real[..., :, None] < real[..., None, :])
    violation = np.abs(real[..., :, None] - real[..., None, :]) * disagree  # (..., P, P)
    return violation.max(axis=-1).mean(axis=-1)


def _normalise(value: np.ndarray, span: np.ndarray) -> np.ndarray:
    span = np.asarray(span, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.abs(span) > 1e-12, value / np.where(np.abs(span) > 1e-12, span, 1.0), np.nan)


def policy_set_metrics(imagined: np.ndarray, real: np.ndarray, imagined_success: np.ndarray,
                       real_success: np.ndarray, random_index: int, oracle_index: int) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRICS` for per-policy means (..., P) -> {name: (...)}.

    ``random_index`` / ``oracle_index``: the policies whose real values are R_random and R_oracle;
    ``mae_normalized`` and ``regret_at_k`` are divided by ``R_oracle - R_random`` (nan where they tie).
    ``success_calibration_error``: ``mean_i |imagined_success_i - real_success_i|``.
    """
    imagined, real = np.asarray(imagined, float), np.asarray(real, float)
    span = real[..., oracle_index] - real[..., random_index]
    mae = mean_absolute_error(imagined, real)
    return {
        "mae": mae,
        "mae_normalized": _normalise(mae, span),
        "spearman": spearman(imagined, real),
        "kendall": kendall(imagined, real),
        "pearson": pearson(imagined, real),
        "regret_at_1": _normalise(regret_at_k(imagined, real, 1), span),
        "regret_at_3": _normalise(regret_at_k(imagined, real, 3), span),
        "mmrv": mmrv(imagined, real),
        "success_calibration_error": mean_absolute_error(imagined_success, real_success),
    }


# ---------------------------------------------------------------------------------------------
# Bootstrap over episodes
# ---------------------------------------------------------------------------------------------


def bootstrap_metrics(imagined: np.ndarray, real: np.ndarray, imagined_success: np.ndarray, real_success: np.ndarray,
                      random_index: int, oracle_index: int, num_resamples: int, seed: int,
                      level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of every metric, over episodes: {name: [low, high]}.

    Arguments are per-episode values (P, N): episode n of every policy, real and imagined, starts
    from the same env seed, so the resampling unit is the episode seed: each resample draws N seeds
    with replacement and keeps all 2P returns of each (the pairing of real with imagined and the
    common start states across policies stay intact). The metrics of all resamples are computed in
    one vectorised call; the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of
    the finite resampled values ([nan, nan] if none is finite).
    """
    arrays = [np.asarray(a, float) for a in (imagined, real, imagined_success, real_success)]
    episodes = arrays[0].shape[-1]
    rng = np.random.default_rng(seed)
    index = rng.integers(0, episodes, size=(int(num_resamples), episodes))  # (B, N)
    means = [a[:, index].mean(axis=-1).T for a in arrays]  # (P, B, N) -> (B, P)
    resampled = policy_set_metrics(*means, random_index=random_index, oracle_index=oracle_index)
    tail = 100 * (1 - level) / 2
    intervals = {}
    for name, values in resampled.items():
        finite = values[np.isfinite(values)]
        low, high = np.percentile(finite, [tail, 100 - tail]) if finite.size else (np.nan, np.nan)
        intervals[name] = [float(low), float(high)]
    return intervals


def evaluation_metrics(imagined: np.ndarray, real: np.ndarray, imagined_success: np.ndarray,
                       real_success: np.ndarray, random_index: int, oracle_index: int, num_resamples: int,
                       seed: int) -> dict[str, float | list[float]]:
    """Point values of :data:`METRICS` on the per-episode values (P, N) and their 95% bootstrap
    intervals under ``<metric>_ci``, as plain floats (nan where undefined)."""
    arrays = [np.asarray(a, float) for a in (imagined, real, imagined_success, real_success)]
    point = policy_set_metrics(*(a.mean(axis=-1) for a in arrays), random_index=random_index,
                               oracle_index=oracle_index)
    intervals = bootstrap_metrics(*arrays, random_index=random_index, oracle_index=oracle_index,
                                  num_resamples=num_resamples, seed=seed)
    out: dict[str, float | list[float]] = {}
    for name in METRICS:
        out[name] = float(point[name])
        out[f"{name}_ci"] = intervals[name]
    return out
