"""Datasets, batches and the deterministic, DDP-aware batch loader.

Example:
    >>> from darkknowledge.data import load_dataset, BatchLoader
    >>> bundle = load_dataset("mnist1d", val_fraction=0.1)
    >>> loader = BatchLoader(bundle.train, 128, seed=0, normalize=bundle.info.normalization)
    >>> for batch in loader: ...
"""

from __future__ import annotations

from darkknowledge.data import sources as _sources  # noqa: F401  (registers the built-in datasets)
from darkknowledge.data.augment import Augment
from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.data.bundle import DataBundle, DatasetInfo, TensorData
from darkknowledge.data.cache import cache_dir
from darkknowledge.data.catalog import DATASETS, list_datasets, load_dataset, register_dataset
from darkknowledge.data.loader import BatchLoader
from darkknowledge.data.sources.common import DataFormatError

__all__ = [
    "DATASETS",
    "UNLABELED",
    "Augment",
    "Batch",
    "BatchLoader",
    "DataBundle",
    "DataFormatError",
    "DatasetInfo",
    "TensorData",
    "cache_dir",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]
