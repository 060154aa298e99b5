"""How sure the world model is of a transition, and how far a transition is from its training data:
signals that say where imagined figures are not to be trusted.

- :func:`step_uncertainty`: the model's own doubt about one imagined step, from the decoder's
  distribution: the sum over the N positions of ``1 - p_max`` (for a calibrated model, the
  expected number of wrong tokens in the most likely next frame) plus ``min(p, 1 - p)`` of the
  reward and termination probabilities. Free of extra models; 0 where every prediction is certain.
- :func:`state_uncertainty`: the same for the state head's reading of the current frame (a
  scripted policy in imagination acts on it, so its errors move the policy's imagined return).
- :class:`NoveltyIndex`: the fraction of the next frame's positions whose local context (the
  3x3 token neighbourhood around the position, with the action) never occurs in the training
  data. The full-view decoder is local (a token's prediction depends on its neighbourhood), so a
  context it never saw is one it has no evidence about, however confident its output.

``benchmarks/uncertainty.py`` measures how well each predicts a real error (AUROC over held-out
transitions, and the rank correlation of a policy's mean signal with its imagined-vs-real gap).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from worldmodel.dynamics import DynamicsCache, DynamicsModel

SIGNALS = ("confidence", "novelty")


@torch.no_grad()
def step_uncertainty(dynamics: DynamicsModel, cache: DynamicsCache, actions: torch.Tensor) -> torch.Tensor:
    """(B,) float: the model's doubt about the next step from ``cache`` under ``actions`` (B,):
    ``sum_n (1 - max_k p_nk) + min(p_r, 1 - p_r) + min(p_t, 1 - p_t)`` (token, reward and
    termination probabilities of the most likely next frame)."""
    logits, outcome = dynamics.predict_logits(cache, actions)
    probs = torch.softmax(logits.float(), dim=-1)
    doubt = (1.0 - probs.max(-1).values).sum(-1)
    if outcome is None:  # local decoding: the outcome is read off the most likely frame
        outcome = dynamics.transition_outcome(cache.tokens, dynamics.tokens_from_logits(logits), actions)
    for column in (0, 2):  # reward happens, termination
        p = torch.sigmoid(outcome[:, column].float())
        doubt = doubt + torch.minimum(p, 1.0 - p)
    return doubt


@torch.no_grad()
def state_uncertainty(dynamics: DynamicsModel, cache: DynamicsCache) -> torch.Tensor:
    """(B,) float: the state head's doubt about the current frames' symbolic state, the sum over
    its fields of ``1 - p_max`` (what a policy reading the state head in imagination may misread)."""
    logits = dynamics.cache_state_logits(cache)
    return (1.0 - torch.softmax(logits.float(), dim=-1).max(-1).values).sum(-1)


def _contexts(tokens: np.ndarray, actions: np.ndarray, vocab: int) -> np.ndarray:
    """(B, h, w) tokens and (B,) actions -> (B, h * w) int64 keys of each position's 3x3
    neighbourhood (outside the grid: the id ``vocab``) and the action."""
    t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    padded = F.pad(t, (1, 1, 1, 1), value=vocab)  # (B, h + 2, w + 2)
    b, h, w = t.shape
    base = vocab + 1
    keys = torch.as_tensor(np.asarray(actions, dtype=np.int64)).view(b, 1, 1).expand(b, h, w).clone()
    for dy in range(3):  # fold the action and the 9 neighbours into one 63-bit hash per position
        for dx in range(3):
            keys = ((keys * base + padded[:, dy : dy + h, dx : dx + w]) * 0x9E3779B1 + 0x7F4A7C15) & 0x7FFFFFFFFFFFFFFF
    return keys.reshape(b, h * w).numpy()


class NoveltyIndex:
    """The (3x3 neighbourhood, action) contexts of a set of transitions; :meth:`novelty` of new ones.

    ``tokens`` (T, h, w) frames and ``actions`` (T,) the action taken from each (a negative action
    marks a frame with no transition after it: an episode's last frame, skipped).
    """

    def __init__(self, tokens: np.ndarray, actions: np.ndarray, vocab_size: int, num_actions: int):
        self.vocab_size, self.num_actions = int(vocab_size), int(num_actions)
        actions = np.asarray(actions)
        keep = actions >= 0
        keys = _contexts(np.asarray(tokens)[keep], actions[keep], self.vocab_size)
        self.known = np.unique(keys)

    @classmethod
    def from_dataset(cls, dataset: Any, tokens: np.ndarray, vocab_size: int, num_actions: int) -> "NoveltyIndex":
        """From an :class:`envs.dataset.EpisodeDataset` (frame-aligned actions, -1 at an episode's
        last frame) and the tokens of all its frames."""
        return cls(tokens, dataset.arrays["actions"], vocab_size, num_actions)

    def novelty(self, tokens: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """(B,) the fraction of positions whose context never occurs in the index."""
        keys = _contexts(tokens, actions, self.vocab_size)
        return 1.0 - np.isin(keys, self.known).mean(-1)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` ranking the ``positives`` (bool) first (ties count
    half); nan without both classes."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
