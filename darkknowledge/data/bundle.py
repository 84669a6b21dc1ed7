"""In-memory datasets and the bundle of splits a dataset builder returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from darkknowledge.data.batch import UNLABELED
from darkknowledge.errors import ConfigError

if TYPE_CHECKING:
    from darkknowledge.data.loader import BatchLoader


class TensorData(Dataset):
    """A dataset held as two tensors; the loader indexes them directly per batch.

    Args:
        x: Inputs ``(N, *input_shape)``; ``uint8`` images ``(N, C, H, W)`` are kept as
            ``uint8`` to save memory (the loader scales them to ``[0, 1]``), anything else
            should be floating point.
        y: Integer labels ``(N,)``, cast to ``int64``; ``UNLABELED`` (-1) marks samples
            without a label.

    Raises:
        ConfigError: Mismatched lengths, non-integer labels or labels below -1.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ConfigError(
                "TensorData needs x (N, ...) and y (N,) of the same length "
                f"(got x {tuple(x.shape)}, y {tuple(y.shape)})"
            )
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ConfigError(f"TensorData labels must be integers (got {y.dtype})")
        y = y.to(torch.int64)
        lowest = int(y.min()) if y.numel() else 0
        if lowest < UNLABELED:
            raise ConfigError(f"TensorData labels must be >= {UNLABELED} (got {lowest})")
        self.x = x
        self.y = y
        self.all_labeled = lowest != UNLABELED
        """No sample is ``UNLABELED`` (batches then say ``labeled=True``)."""
        self._copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of ``x`` and ``y``."""
        return self.x.element_size() * self.x.numel() + self.y.element_size() * self.y.numel()

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` on ``device``: copied there on the first call and kept, so every loader
        over this data (train, evaluation, cache build) shares one copy."""
        if self.x.device == device:
            return self.x, self.y
        key = str(device)
        if key not in self._copies:
            self._copies[key] = (self.x.to(device), self.y.to(device))
        return self._copies[key]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(3, 32, 32)``."""
        return tuple(self.x.shape[1:])

    @property
    def num_labeled(self) -> int:
        """Number of samples whose label is not ``UNLABELED``."""
        return int((self.y != UNLABELED).sum())

    def subset(self, indices: torch.Tensor) -> TensorData:
        """A new ``TensorData`` with the samples at ``indices`` (in that order)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)  # (M,)
        return TensorData(self.x[indices], self.y[indices])

    def __repr__(self) -> str:
        shape = tuple(self.x.shape)
        return f"TensorData(n={len(self)}, x={shape} {self.x.dtype}, labeled={self.num_labeled})"


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a run need to know about a dataset.

    Attributes:
        name: Registered dataset name.
        num_classes: Number of classes of the labels.
        input_shape: Shape of one input without the batch dimension, e.g. ``(40,)``, ``(3, 32, 32)``.
        mean: Per-channel mean the loader still has to subtract (on the ``[0, 1]`` scale for
            ``uint8`` images), or None when the stored data is already normalised.
        std: Per-channel standard deviation, paired with ``mean``.
        fingerprint: Short sha256 over the dataset's identity (name, parameters, data bytes);
            caches and checkpoints compare it to detect changed data.
        class_names: Names of the classes where known (e.g. an image folder's directories).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    fingerprint: str = ""
    class_names: tuple[str, ...] = field(default=())

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """``(mean, std)`` to pass as ``BatchLoader(normalize=...)``, or None."""
        if self.mean is None or self.std is None:
            return None
        return self.mean, self.std


def _size(data: Dataset | None) -> str:
    return "-" if data is None else str(len(data))  # type: ignore[arg-type]


@dataclass(frozen=True)
class DataBundle:
    """The splits of one dataset plus its info.

    Attributes:
        train: Training split.
        test: Held-out test split.
        info: Shapes, classes, normalisation and fingerprint.
        val: Optional validation split (carved from train by ``val_fraction``).
        transfer: Optional extra (usually unlabeled, ``y == UNLABELED``) samples for distillation.
    """

    train: Dataset
    test: Dataset
    info: DatasetInfo
    val: Dataset | None = None
    transfer: Dataset | None = None

    def split(self, name: str) -> Dataset:
        """Return the split called ``name`` (``train``, ``val``, ``test`` or ``transfer``).

        Raises:
            ConfigError: Unknown split, or one this bundle does not have.
        """
        if name not in ("train", "val", "test", "transfer"):
            raise ConfigError(f"unknown split {name!r}; valid splits: train, val, test, transfer")
        data = getattr(self, name)
        if data is None:
            raise ConfigError(f"dataset {self.info.name!r} has no {name} split")
        return data

    def loader(self, split: str, batch_size: int, **kwargs: Any) -> BatchLoader:
        """A ``BatchLoader`` over ``split`` that normalises with ``info.mean/std``.

        Args:
            split: ``train``, ``val``, ``test`` or ``transfer``.
            batch_size: Global batch size.
            **kwargs: Further ``BatchLoader`` arguments (``normalize`` defaults to
                ``info.normalization``).
        """
        from darkknowledge.data.loader import BatchLoader

        kwargs.setdefault("normalize", self.info.normalization)
        return BatchLoader(self.split(split), batch_size, **kwargs)

    def describe(self) -> str:
        """A few human-readable lines: name, fingerprint, shapes and split sizes."""
        info = self.info
        dtype = ""
        if isinstance(self.train, TensorData):
            dtype = f", stored as {str(self.train.x.dtype).removeprefix('torch.')}"
        lines = [
            f"dataset {info.name} [{info.fingerprint or 'no fingerprint'}]: "
            f"{info.num_classes} classes, input {info.input_shape}{dtype}",
            f"  train {_size(self.train)} | val {_size(self.val)} | test {_size(self.test)} "
            f"| transfer {_size(self.transfer)}",
        ]
        if isinstance(self.transfer, TensorData):
            lines[-1] += f" ({len(self.transfer) - self.transfer.num_labeled} unlabeled)"
        if info.mean is not None and info.std is not None:
            mean = ", ".join(f"{m:.4f}" for m in info.mean)
            std = ", ".join(f"{s:.4f}" for s in info.std)
            lines.append(f"  normalise: mean ({mean}) std ({std})")
        else:
            lines.append("  normalise: none (stored data already normalised)")
        return "\n".join(lines)
