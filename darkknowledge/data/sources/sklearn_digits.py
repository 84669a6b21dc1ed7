"""scikit-learn's 8x8 handwritten digits (1797 images, bundled with sklearn, no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field

from darkknowledge.data.bundle import DataBundle, DatasetInfo, TensorData
from darkknowledge.data.catalog import register_dataset
from darkknowledge.data.splits import stratified_split

NUM_CLASSES = 10
MAX_PIXEL = 16.0  # load_digits pixels are integers 0..16


@register_dataset("digits", example=lambda root, variant: {"test_fraction": 0.2 + 0.1 * variant})
def digits(
    *,
    root: Path,
    split_seed: int,
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2,
) -> DataBundle:
    """sklearn ``load_digits`` as ``(1, 8, 8)`` float32 images, standardised with train stats.

    Pixels are scaled to ``[0, 1]``, then shifted and scaled by the training split's scalar
    mean and std, so ``info.mean/std`` are None (nothing left for the loader to do).

    Args:
        root: Unused (the data ships with scikit-learn).
        split_seed: Seed of the per-class (stratified) train/test split.
        test_fraction: Share of each class put into the test split.
    """
    from sklearn.datasets import load_digits

    del root
    raw = load_digits()
    x = torch.as_tensor(raw.images, dtype=torch.float32).unsqueeze(1) / MAX_PIXEL  # (1797, 1, 8, 8)
    y = torch.as_tensor(raw.target, dtype=torch.int64)  # (1797,)
    train_idx, test_idx = stratified_split(y, test_fraction, split_seed)
    x_train, x_test = x[train_idx], x[test_idx]
    mean, std = x_train.mean(), x_train.std(unbiased=False)
    info = DatasetInfo(name="digits", num_classes=NUM_CLASSES, input_shape=(1, 8, 8))
    return DataBundle(
        train=TensorData((x_train - mean) / std, y[train_idx]),
        test=TensorData((x_test - mean) / std, y[test_idx]),
        info=info,
    )
