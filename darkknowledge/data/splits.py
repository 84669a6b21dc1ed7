"""Deterministic train/validation/test index splits."""

from __future__ import annotations

import torch

from darkknowledge.data.seeds import make_generator
from darkknowledge.errors import ConfigError

_SPLIT_STREAM = 3  # tag so split draws never coincide with other streams of the same seed
_SUBSET_STREAM = 6  # the labelled subset (data.train_samples): independent of the validation split's draws


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


def stratified_subset(y: torch.Tensor, n: int, seed: int, where: str = "data.train_samples") -> torch.Tensor:
    """Pick ``n`` samples so that each class keeps its share of the labels (at least one each).

    Each class ``c`` with ``n_c`` of the ``len(y)`` samples gets ``floor(n * n_c / len(y))``
    samples, at least one; the samples left to place go to the classes with the largest
    remainders (ties: the smaller class index). Within a class the samples are a random draw
    seeded by ``seed``, so the same seed gives the same subset.

    Args:
        y: Labels ``(N,)`` of the split to draw from.
        n: Number of samples to keep, from the number of classes present up to ``N``.
        seed: Subset seed (``data.split_seed``).
        where: Config path named in errors.

    Returns:
        Sorted indices ``(n,)`` into ``y``.

    Raises:
        ConfigError: ``n`` is larger than the split or smaller than its number of classes.
    """
    labels = torch.unique(y)  # (K,) sorted
    total, k = int(y.numel()), int(labels.numel())
    if isinstance(n, bool) or not isinstance(n, int) or not k <= n <= total:
        raise ConfigError(
            f"{where}={n!r}: expected an integer from {k} (one sample per class, {k} classes) to {total} "
            "(the training split's size after the validation split is carved)"
        )
    counts = torch.stack([(y == c).sum() for c in labels]).to(torch.float64)  # (K,)
    share = counts * n / total  # (K,)
    take = share.floor().clamp(min=1).to(torch.int64)  # (K,)
    while int(take.sum()) > n:  # the minimum of one sample per class overshot: trim the largest shares
        over = torch.where(take > 1, take.double() - share, torch.full_like(share, -torch.inf))  # (K,)
        take[int(torch.argmax(over))] -= 1
    remainder = share - take.double()  # (K,)
    order = sorted(range(k), key=lambda i: (-float(remainder[i]), i))
    for i in order[: n - int(take.sum())]:
        take[i] += 1
    gen = make_generator(seed, _SUBSET_STREAM)
    picked = []
    for c, m in zip(labels.tolist(), take.tolist(), strict=True):  # sorted classes: draws in a fixed order
        members = torch.nonzero(y == c).flatten()  # (n_c,)
        picked.append(members[torch.randperm(members.numel(), generator=gen)[:m]])
    return torch.cat(picked).sort().values
