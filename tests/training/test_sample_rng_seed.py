"""The per-sample seeding goes straight to the C seeders; it must seed exactly as the public functions.

A checkpoint written before that shortcut resumes with the same augmentations only if both paths
leave torch's, numpy's and Python's generators in identical states -- including the cached second
Gaussian that numpy's legacy ``randn`` and Python's ``gauss`` keep between calls.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ckptvault.training.sample_rng import current_sample_seed, sample_seed, seed_global_rngs


def _draws() -> tuple[list[float], list[float], list[float]]:
    return (
        torch.randn(3).tolist() + torch.rand(2).tolist(),
        np.random.randn(3).tolist() + np.random.rand(2).tolist(),
        [random.gauss(0, 1), random.random(), random.gauss(0, 1)],
    )


def _dirty_gaussian_caches() -> None:
    """Leaves a cached Gaussian in every generator that keeps one, so a seeding that forgets to drop
    it shows up in the next draw."""
    torch.randn(1)
    np.random.randn(1)
    random.gauss(0, 1)


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, sample_seed(7, 3), sample_seed(2**63, 10**6)])
def test_per_sample_seeding_equals_the_public_seeders(seed: int) -> None:
    _dirty_gaussian_caches()
    torch.default_generator.manual_seed(seed)
    np.random.seed((seed ^ (seed >> 32)) & 0xFFFFFFFF)
    random.seed(seed)
    expected = _draws()

    _dirty_gaussian_caches()
    seed_global_rngs(seed)
    assert _draws() == expected
    assert current_sample_seed() == seed


def test_different_seeds_give_different_draws() -> None:
    seed_global_rngs(sample_seed(1, 0))
    first = _draws()
    seed_global_rngs(sample_seed(1, 1))
    assert _draws() != first
