"""Synthetic class-conditional data: stand-in inputs for datasets that cannot be downloaded here.

Smoke tests of recipes and suites written for CIFAR-100 or ImageNet need inputs of the right
shape and class count, not the real images. Each class ``k`` gets a random mean ``mu_k`` of the
given ``shape`` (``N(0, 1)`` per element); a sample of class ``k`` is ``mu_k + noise * eps``
with ``eps ~ N(0, 1)``, so a model can learn something (the classes differ in their means).
Everything is drawn from one generator seeded by ``split_seed``: the same parameters give
the same tensors, bit for bit.

Labels: each split cycles through a random permutation of the classes (then the order of the
samples is shuffled), so every class occurs once the split has at least ``num_classes``
samples, and no class occurs twice before every class has occurred once.

Storage: a 3-D ``shape`` ``(C, H, W)`` is stored like CIFAR, as ``uint8`` images
(``128 + 32 * value``, rounded and clipped to ``0..255``) with per-channel mean/std for the
loader to normalise, so a smoke test takes the same path as the real image datasets; any
other rank is stored as ``float32`` values, already centred (``info.mean/std`` are None).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field

from darkknowledge.data.bundle import DataBundle, DatasetInfo, TensorData
from darkknowledge.data.catalog import register_dataset
from darkknowledge.data.seeds import make_generator
from darkknowledge.data.sources.common import channel_stats
from darkknowledge.errors import ConfigError

SYNTHETIC_STREAM = 3
"""Stream tag of the synthetic dataset's generator (mixed with ``split_seed``)."""

PIXEL_CENTER = 128.0
PIXEL_SCALE = 32.0  # one unit of the drawn values = 32 grey levels of a uint8 image


def cycled_labels(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` labels that cycle through a random permutation of the classes, then shuffled.

    Args:
        n: Number of labels.
        num_classes: Number of classes ``K``.
        generator: The source of randomness.

    Returns:
        ``(n,)`` int64 labels in ``[0, K)``; every class occurs when ``n >= K``, and the class
        counts differ by at most one.
    """
    classes = torch.randperm(num_classes, generator=generator)  # (K,)
    labels = classes.repeat(-(-n // num_classes))[:n]  # (n,)
    return labels[torch.randperm(n, generator=generator)]  # (n,)


def draw_split(
    means: torch.Tensor, n: int, noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples around the class means.

    Args:
        means: ``(K, *shape)`` class means.
        n: Number of samples.
        noise: Standard deviation of the per-element noise.
        generator: The source of randomness.

    Returns:
        ``(x (n, *shape) float32, y (n,) int64)``.
    """
    y = cycled_labels(n, means.shape[0], generator)  # (n,)
    eps = torch.randn((n, *means.shape[1:]), generator=generator)  # (n, *shape)
    return means[y] + noise * eps, y


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Drawn values ``(n, C, H, W)`` as uint8 images: ``128 + 32 * x``, rounded and clipped."""
    return (PIXEL_CENTER + PIXEL_SCALE * x).round().clamp(0, 255).to(torch.uint8)  # (n, C, H, W)


def example(root: Path, variant: int = 0) -> dict[str, Any]:
    """A tiny instance: 5 classes of ``3x8x8`` images; ``variant`` changes the sample count."""
    del root
    return {"shape": [3, 8, 8], "num_classes": 5, "train_samples": 40 + 10 * variant, "test_samples": 20}


@register_dataset("synthetic", example=example)
def synthetic(
    *,
    root: Path,
    split_seed: int,
    shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = [3, 32, 32],  # noqa: B006
    num_classes: Annotated[int, Field(ge=2)] = 100,
    train_samples: Annotated[int, Field(ge=1)] = 5000,
    test_samples: Annotated[int, Field(ge=1)] = 1000,
    noise: Annotated[float, Field(ge=0.0)] = 1.0,
) -> DataBundle:
    """Random, deterministic inputs of ``shape`` whose mean depends on the class.

    Args:
        root: Unused (nothing is read or written).
        split_seed: Seed of every draw (class means, labels, noise).
        shape: Shape of one input, e.g. ``[3, 32, 32]`` (stored as uint8 images) or ``[40]``.
        num_classes: Number of classes.
        train_samples: Samples in the training split (a validation split is carved from it).
        test_samples: Samples in the test split.
        noise: Standard deviation of the noise around the class means (the means are
            ``N(0, 1)`` per element): larger is harder.

    Raises:
        ConfigError: The inputs would not fit in memory-sized tensors (over 2^31 elements).
    """
    del root
    if math.prod(shape) * max(num_classes, train_samples, test_samples) >= 2**31:
        raise ConfigError(
            f"dataset 'synthetic': shape {list(shape)} with {num_classes} classes, "
            f"{train_samples} train / {test_samples} test samples is too large; use a smaller "
            "shape or fewer samples (it is meant for smoke tests)"
        )
    gen = make_generator(split_seed, SYNTHETIC_STREAM)
    means = torch.randn((num_classes, *shape), generator=gen)  # (K, *shape)
    x_train, y_train = draw_split(means, train_samples, noise, gen)  # (N, *shape), (N,)
    x_test, y_test = draw_split(means, test_samples, noise, gen)  # (M, *shape), (M,)
    if len(shape) == 3:  # images, stored and normalised like CIFAR
        train, test = TensorData(to_uint8(x_train), y_train), TensorData(to_uint8(x_test), y_test)
        mean, std = channel_stats(train.x)
        info = DatasetInfo("synthetic", num_classes, tuple(shape), mean=mean, std=std)
    else:
        train, test = TensorData(x_train, y_train), TensorData(x_test, y_test)
        info = DatasetInfo("synthetic", num_classes, tuple(shape))
    return DataBundle(train=train, test=test, info=info)
