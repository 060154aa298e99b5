"""The one seeding helper. Same config and seed on the CPU give the same numbers."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int, deterministic_torch: bool = True) -> np.random.Generator:
    """Seed Python, NumPy and torch; return a NumPy generator derived from ``seed``.

    Environments are seeded separately and explicitly on every ``reset(seed=...)``.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch

        torch.manual_seed(seed)
        if deterministic_torch:
            torch.use_deterministic_algorithms(True, warn_only=True)
    except ImportError:  # torch is a hard dependency, but envs/ must import without it
        pass
    return np.random.default_rng(seed)


def derive_seed(*parts: int) -> int:
    """A stable 32-bit seed from integers (e.g. ``derive_seed(base_seed, episode_index)``)."""
    sequence = np.random.SeedSequence([int(p) % 2**63 for p in parts])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])
