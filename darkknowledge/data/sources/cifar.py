"""CIFAR-10 and CIFAR-100 read from the official "python version" pickles."""

from __future__ import annotations

import codecs
import importlib
import pickle
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
    missing_files_error,
    torchvision_download,
)

IMAGE_SHAPE = (3, 32, 32)
_ALLOWED_GLOBALS = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists of numpy arrays and nothing else (no arbitrary code)."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "numpy" and name in _ALLOWED_GLOBALS:
            if module.startswith("numpy.core") and hasattr(np, "_core"):  # numpy>=2 renamed it
                module = "numpy._core" + module[len("numpy.core") :]
            return getattr(importlib.import_module(module), name)
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles from Python 3 store bytes
            return codecs.encode
        raise DataFormatError(f"refusing to unpickle {module}.{name} from a CIFAR batch file")


def _get(batch: dict[Any, Any], key: str) -> Any:
    """``batch[key]`` whether the pickle stored the key as bytes or str."""
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise KeyError(key)


def read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch file.

    Args:
        path: A pickled dict with ``b"data"`` ``(N, 3072)`` uint8 and integer labels.
        label_key: ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100).

    Returns:
        ``(images (N, 3, 32, 32) uint8, labels (N,) int64)``.

    Raises:
        DataFormatError: Not a CIFAR batch.
    """
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()  # the originals are Python 2 pickles
        data, labels = _get(batch, "data"), _get(batch, label_key)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError) as exc:
        raise DataFormatError(f"{path} is not a CIFAR batch with 'data' and {label_key!r} ({exc!r})") from None
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != int(np.prod(IMAGE_SHAPE)) or data.shape[0] != labels.shape[0]:
        raise DataFormatError(f"{path}: data {data.shape} / labels {labels.shape} do not form (N, 3072) / (N,)")
    return data.reshape(-1, *IMAGE_SHAPE), labels  # rows are R(1024) G(1024) B(1024), row-major


def _read_files(dataset: str, paths: list[Path], label_key: str, num_classes: int) -> TensorData:
    parts = [read_batch(p, label_key) for p in paths]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))  # (N, 3, 32, 32) uint8
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))  # (N,) int64
    check_labels(dataset, y, num_classes, paths[0].parent)
    return TensorData(x, y)


def load_cifar(
    dataset: str,
    tv_class: str,
    folder: str,
    train_files: list[str],
    test_files: list[str],
    label_key: str,
    num_classes: int,
    root: Path,
    download: bool,
) -> DataBundle:
    """Read (optionally download first) a CIFAR dataset from ``<root>/<folder>/``."""
    directory = root / folder

    def missing() -> list[str]:
        return [n for n in train_files + test_files if not (directory / n).is_file()]

    if missing() and download:
        torchvision_download(dataset, tv_class, root)
    absent = missing()
    if absent:
        raise missing_files_error(dataset, directory, absent, download_hint(dataset, tv_class))
    train = _read_files(dataset, [directory / n for n in train_files], label_key, num_classes)
    test = _read_files(dataset, [directory / n for n in test_files], label_key, num_classes)
    mean, std = channel_stats(train.x)
    info = DatasetInfo(dataset, num_classes, IMAGE_SHAPE, mean=mean, std=std)
    return DataBundle(train=train, test=test, info=info)


def write_batch(path: Path, data: np.ndarray, labels: np.ndarray, label_key: str) -> None:
    """Write one CIFAR batch file as the originals are laid out: a pickled dict with ``data``
    ``(N, 3072)`` uint8 (R, G, B planes, row-major) and the labels under ``label_key``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {
        b"data": np.ascontiguousarray(data.reshape(len(data), -1), dtype=np.uint8),
        label_key.encode(): [int(v) for v in labels],
    }
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=2)


def cifar_example(folder: str, train_files: list[str], test_files: list[str], label_key: str, num_classes: int) -> Any:
    """An ``example`` for a CIFAR dataset: 4 random images per batch file under ``<root>/<folder>``."""

    def example(root: Path, variant: int = 0) -> dict[str, Any]:
        rng = np.random.default_rng(variant)
        for name in train_files + test_files:
            write_batch(
                root / folder / name,
                rng.integers(0, 256, (4, *IMAGE_SHAPE), dtype=np.uint8),
                rng.integers(0, num_classes, 4),
                label_key,
            )
        return {}

    return example


CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


@register_dataset("cifar10", example=cifar_example("cifar-10-batches-py", CIFAR10_TRAIN, ["test_batch"], "labels", 10))
def cifar10(*, root: Path, split_seed: int, download: bool = False) -> DataBundle:
    """CIFAR-10, ``uint8`` ``(3, 32, 32)``, from ``<root>/cifar-10-batches-py/``.

    Args:
        root: Parent of ``cifar-10-batches-py`` (torchvision's ``root``).
        split_seed: Unused (the official split is kept).
        download: Fetch the files with torchvision when they are missing.
    """
    del split_seed
    return load_cifar(
        "cifar10", "CIFAR10", "cifar-10-batches-py", CIFAR10_TRAIN, ["test_batch"], "labels", 10, root, download
    )


@register_dataset("cifar100", example=cifar_example("cifar-100-python", ["train"], ["test"], "fine_labels", 100))
def cifar100(*, root: Path, split_seed: int, download: bool = False) -> DataBundle:
    """CIFAR-100 (fine labels), ``uint8`` ``(3, 32, 32)``, from ``<root>/cifar-100-python/``.

    Args:
        root: Parent of ``cifar-100-python`` (torchvision's ``root``).
        split_seed: Unused (the official split is kept).
        download: Fetch the files with torchvision when they are missing.
    """
    del split_seed
    return load_cifar(
        "cifar100", "CIFAR100", "cifar-100-python", ["train"], ["test"], "fine_labels", 100, root, download
    )
