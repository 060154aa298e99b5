"""The world model's trust signals: the decoder's own doubt, the novelty of a transition's local
context against the training data, and the AUROC that measures how well either predicts an error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.test_dynamics import small_config
from worldmodel.dynamics import DynamicsModel
from worldmodel.uncertainty import NoveltyIndex, auroc, step_uncertainty


def test_auroc_hand_cases():
    wrong = np.array([False, False, True, True])
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), wrong) == 1.0  # every error ranked above every right step
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), wrong) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), wrong) == 0.5  # ties count half
    assert auroc(np.array([0.1, 0.6, 0.5, 0.9]), wrong) == 0.75  # one of four pairs out of order
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([True, True])))


def test_novelty_is_zero_on_the_training_transitions_and_counts_new_contexts():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 6, size=(20, 5, 5))
    actions = rng.integers(0, 3, size=20)
    actions[-1] = -1  # the last frame has no transition after it
    index = NoveltyIndex(frames, actions, vocab_size=6, num_actions=3)
    assert np.all(index.novelty(frames[:-1], actions[:-1]) == 0.0)
    assert np.all(index.novelty(frames[:-1], np.full(19, 5)) == 1.0)  # an action never taken: every context new
    changed = frames[:1].copy()
    changed[0, 2, 2] = (changed[0, 2, 2] + 1) % 6
    novelty = index.novelty(changed, actions[:1])[0]
    assert 0 < novelty <= 9 / 25  # only the 3x3 around the changed cell can be new


def test_step_uncertainty_is_a_bounded_per_row_doubt():
    torch.manual_seed(0)
    model = DynamicsModel(small_config()).eval()
    tokens = torch.randint(0, 32, (3, 1, 5, 5))
    cache, _ = model.start(tokens, torch.zeros(3, 0, dtype=torch.long))
    doubt = step_uncertainty(model, cache, torch.tensor([0, 2, 6]))
    assert doubt.shape == (3,) and torch.isfinite(doubt).all()
    assert (doubt >= 0).all() and (doubt <= 25 + 2).all()  # at most every token wrong plus both outcomes
    assert doubt.min() > 1.0  # an untrained model is unsure of many tokens
    from worldmodel.uncertainty import state_uncertainty

    state_doubt = state_uncertainty(model, cache)
    assert state_doubt.shape == (3,) and (state_doubt > 0).all() and (state_doubt <= model.config.state_size).all()


def test_world_model_uncertainty_needs_a_reset():
    from worldmodel.imagine import WorldModel

    class Tokenizer:
        vocab_size = 32

    with pytest.raises(RuntimeError, match="call reset first"):
        WorldModel(Tokenizer(), DynamicsModel(small_config())).uncertainty([0])
