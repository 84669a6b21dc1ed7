"""Derive independent, history-free RNG seeds from tuples of integers.

Every random stream of the data layer (epoch permutations, augmentation draws, extra
generated samples) is seeded from a tuple such as ``(seed, epoch)``. The tuple is mixed by
numpy's ``SeedSequence``, so nearby tuples give unrelated streams and a stream never depends
on what was drawn before it (which is what makes resuming mid-run exact).
"""

from __future__ import annotations

import numpy as np
import torch

from darkknowledge.errors import ConfigError

PERMUTATION_STREAM = 0
"""Stream tag of the per-epoch sample permutation."""

AUGMENT_STREAM = 1
"""Stream tag of the per-batch augmentation draws."""

TRANSFER_STREAM = 2
"""Stream tag of generated unlabeled transfer samples."""


def derive_seed(*parts: int) -> int:
    """Mix non-negative integers into one 63-bit seed.

    Args:
        *parts: Non-negative integers, e.g. ``(seed, epoch, stream)``.

    Returns:
        A seed in ``[0, 2**63)`` usable by ``torch.Generator.manual_seed``.

    Raises:
        ConfigError: A part is negative.
    """
    values = [int(p) for p in parts]
    if any(v < 0 for v in values):
        raise ConfigError(f"seeds must be non-negative integers (got {tuple(values)})")
    state = np.random.SeedSequence(values).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def make_generator(*parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(*parts)``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(*parts))
    return gen
