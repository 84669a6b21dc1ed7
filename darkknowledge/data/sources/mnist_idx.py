"""MNIST and Fashion-MNIST read from torchvision's on-disk layout (IDX files)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from darkknowledge.data.bundle import DataBundle, DatasetInfo, TensorData
from darkknowledge.data.catalog import register_dataset
from darkknowledge.data.sources.common import (
    DataFormatError,
    channel_stats,
    check_labels,
    download_hint,
    find_file,
    missing_files_error,
    torchvision_download,
)
from darkknowledge.data.sources.idx_format import read_idx, write_idx

NUM_CLASSES = 10
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""Split -> (images file, labels file), each optionally with ``.gz``."""


def raw_dir(root: Path, folder: str) -> Path:
    """``<root>/<folder>/raw``, where torchvision keeps the IDX files."""
    return root / folder / "raw"


def _missing(directory: Path) -> list[str]:
    names = [n for pair in SPLIT_FILES.values() for n in pair]
    return [f"{n}[.gz]" for n in names if find_file(directory, n) is None]


def _read_split(dataset: str, directory: Path, images_name: str, labels_name: str) -> TensorData:
    images_path = find_file(directory, images_name)
    labels_path = find_file(directory, labels_name)
    if images_path is None or labels_path is None:
        raise missing_files_error(dataset, directory, [images_name, labels_name], "")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataFormatError(
            f"dataset {dataset!r}: {images_path.name} {images.shape} and {labels_path.name} {labels.shape} "
            "must be (N, H, W) images and (N,) labels"
        )
    x = torch.from_numpy(images).to(torch.uint8).unsqueeze(1)  # (N, 1, H, W)
    y = torch.from_numpy(labels).to(torch.int64)  # (N,)
    check_labels(dataset, y, NUM_CLASSES, labels_path)
    return TensorData(x, y)


def load_idx_dataset(dataset: str, tv_class: str, root: Path, download: bool) -> DataBundle:
    """Read (optionally download first) an MNIST-style dataset from ``<root>/<tv_class>/raw``.

    Args:
        dataset: Registered name, for messages and the info.
        tv_class: torchvision class name, which is also its folder name (``MNIST``).
        root: Dataset root (the parent of the ``<tv_class>`` folder).
        download: Download with torchvision when files are missing.

    Raises:
        ConfigError: Files missing (and not downloadable).
    """
    directory = raw_dir(root, tv_class)
    if _missing(directory) and download:
        torchvision_download(dataset, tv_class, root)
    missing = _missing(directory)
    if missing:
        raise missing_files_error(dataset, directory, missing, download_hint(dataset, tv_class))
    train = _read_split(dataset, directory, *SPLIT_FILES["train"])
    test = _read_split(dataset, directory, *SPLIT_FILES["test"])
    mean, std = channel_stats(train.x)
    info = DatasetInfo(dataset, NUM_CLASSES, train.sample_shape, mean=mean, std=std)
    return DataBundle(train=train, test=test, info=info)


def idx_example(folder: str, n_train: int = 12, n_test: int = 5) -> Callable[[Path, int], dict[str, Any]]:
    """An ``example`` for an MNIST-style dataset: random 28x28 images in IDX files under
    ``<root>/<folder>/raw`` (``variant`` seeds them)."""

    def example(root: Path, variant: int = 0) -> dict[str, Any]:
        rng = np.random.default_rng(variant)
        for split, n in (("train", n_train), ("test", n_test)):
            images, labels = SPLIT_FILES[split]
            write_idx(raw_dir(root, folder) / images, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
            write_idx(raw_dir(root, folder) / labels, rng.integers(0, NUM_CLASSES, n, dtype=np.uint8))
        return {}

    return example


@register_dataset("mnist", example=idx_example("MNIST"))
def mnist(*, root: Path, split_seed: int, download: bool = False) -> DataBundle:
    """MNIST digits, ``uint8`` ``(1, 28, 28)``, from ``<root>/MNIST/raw/*-idx?-ubyte[.gz]``.

    Args:
        root: Parent of the ``MNIST`` folder (torchvision's ``root``).
        split_seed: Unused (the official train/test split is kept).
        download: Fetch the files with torchvision when they are missing.
    """
    del split_seed
    return load_idx_dataset("mnist", "MNIST", root, download)


@register_dataset("fashion_mnist", example=idx_example("FashionMNIST"))
def fashion_mnist(*, root: Path, split_seed: int, download: bool = False) -> DataBundle:
    """Fashion-MNIST, ``uint8`` ``(1, 28, 28)``, from ``<root>/FashionMNIST/raw/``.

    Args:
        root: Parent of the ``FashionMNIST`` folder (torchvision's ``root``).
        split_seed: Unused (the official train/test split is kept).
        download: Fetch the files with torchvision when they are missing.
    """
    del split_seed
    return load_idx_dataset("fashion_mnist", "FashionMNIST", root, download)
