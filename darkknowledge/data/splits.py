"""Deterministic train/validation/test index splits."""

from __future__ import annotations

import torch

from darkknowledge.data.seeds import make_generator
from darkknowledge.errors import ConfigError

_SPLIT_STREAM = 3  # tag so split draws never coincide with other streams of the same seed


def check_fraction(value: float, where: str) -> None:
    """Raise ``ConfigError`` unless ``0 <= value < 1``."""
    if not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{where}: must be in [0, 1) (got {value!r})")


def random_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into ``(keep, held_out)`` with ``round(fraction * n)`` held out.

    Both index tensors are sorted, so the kept samples stay in their original order.

    Args:
        n: Number of samples.
        fraction: Share held out, in ``[0, 1)``.
        seed: Split seed; the same seed gives the same split.
    """
    check_fraction(fraction, "val_fraction")
    n_out = int(round(fraction * n))
    if fraction > 0 and n_out == 0 and n > 1:
        n_out = 1
    if n_out >= n:
        raise ConfigError(f"val_fraction={fraction} leaves no training samples out of {n}")
    perm = torch.randperm(n, generator=make_generator(seed, _SPLIT_STREAM))  # (n,)
    held = perm[:n_out].sort().values
    keep = perm[n_out:].sort().values
    return keep, held


def stratified_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split so that each class gives about ``fraction`` of its samples to the held-out part.

    Args:
        y: Labels ``(N,)``.
        fraction: Share held out per class, in ``[0, 1)``.
        seed: Split seed.

    Returns:
        ``(keep, held_out)`` sorted index tensors.
    """
    check_fraction(fraction, "test_fraction")
    gen = make_generator(seed, _SPLIT_STREAM)
    keep, held = [], []
    for label in torch.unique(y).tolist():  # sorted, so draws happen in a fixed order
        members = torch.nonzero(y == label).flatten()  # (n_c,)
        members = members[torch.randperm(members.numel(), generator=gen)]
        n_out = int(round(fraction * members.numel()))
        held.append(members[:n_out])
        keep.append(members[n_out:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values
