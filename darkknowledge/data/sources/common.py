"""Helpers shared by the on-disk dataset readers: file checks, optional download, stats."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from darkknowledge.errors import ConfigError, DarkKnowledgeError

logger = logging.getLogger(__name__)

VISION_EXTRA = 'pip install "darkknowledge[vision]"'


class DataFormatError(DarkKnowledgeError, ValueError):
    """A dataset file exists but is not in the expected format (corrupt or wrong file)."""


def find_file(directory: Path, name: str) -> Path | None:
    """Return ``directory/name`` or ``directory/name.gz``, whichever exists (plain first)."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def missing_files_error(dataset: str, directory: Path, names: Sequence[str], how: str) -> ConfigError:
    """A ``ConfigError`` naming the missing files, where they were expected and how to get them.

    Args:
        dataset: Registered dataset name.
        directory: Directory the files were expected in.
        names: Missing file names.
        how: Sentence on how to obtain the files.
    """
    listing = ", ".join(names)
    return ConfigError(f"dataset {dataset!r}: missing file(s) {listing} in {directory}. {how}")


def download_hint(dataset: str, tv_class: str) -> str:
    """The 'how to get it' sentence for torchvision-downloadable datasets."""
    return (
        f"Pass download=True in data.params (needs torchvision: {VISION_EXTRA}) or place the files "
        f"there as torchvision.datasets.{tv_class} lays them out (data.root is the parent of that directory)."
    )


def torchvision_download(dataset: str, tv_class: str, root: Path) -> None:
    """Download both splits of ``torchvision.datasets.<tv_class>`` into ``root``.

    torchvision is imported lazily and used only for downloading; reading is done by
    darkknowledge's own format readers.

    Raises:
        ConfigError: torchvision is not installed.
    """
    try:
        tv_datasets = importlib.import_module("torchvision.datasets")
    except ImportError:
        raise ConfigError(
            f"dataset {dataset!r}: download=True needs torchvision, which is not installed. "
            f"Install it with {VISION_EXTRA}, or place the files under {root} yourself."
        ) from None
    root.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s into %s with torchvision", tv_class, root)
    cls = getattr(tv_datasets, tv_class)
    for train in (True, False):
        cls(str(root), train=train, download=True)


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``uint8`` images on the ``[0, 1]`` scale.

    Args:
        x: ``uint8`` images ``(N, C, H, W)``.
        chunk: Images per step, to bound the float64 working memory.

    Returns:
        ``(mean, std)``, each a tuple of ``C`` floats (population std).
    """
    channels = x.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for part in x.split(chunk):
        values = part.to(torch.float64) / 255.0  # (n, C, H, W)
        total += values.sum(dim=(0, 2, 3))
        total_sq += values.square().sum(dim=(0, 2, 3))
    count = max(x.shape[0] * x.shape[2] * x.shape[3], 1)
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def check_labels(dataset: str, y: torch.Tensor, num_classes: int, source: Path) -> None:
    """Raise ``DataFormatError`` when a label is outside ``[0, num_classes)``."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataFormatError(
            f"dataset {dataset!r}: labels in {source} must lie in [0, {num_classes}) "
            f"(found {int(y.min())}..{int(y.max())})"
        )
