"""The bundle of splits a dataset builder returns, and what a run needs to know about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from darkknowledge.data.batch import UNLABELED
from darkknowledge.data.loader import BatchLoader
from darkknowledge.data.tensors import TensorData
from darkknowledge.errors import ConfigError

if TYPE_CHECKING:
    from darkknowledge.data.view_plan import ViewPlan

__all__ = ["DataBundle", "DatasetInfo", "TensorData"]


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
        view: Name of the stored input's view (``image``, ``signal``; ``input`` by default), what a
            model's ``input:`` names on a paired dataset.
        views: Every view of a paired dataset (stored and derived, see
            :mod:`darkknowledge.data.paired`); None when ``x`` is the only one.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    fingerprint: str = ""
    class_names: tuple[str, ...] = field(default=())
    view: str = "input"
    views: ViewPlan | None = None

    def input_shape_of(self, view: str | None, where: str = "input") -> tuple[int, ...]:
        """The per-sample shape of view ``view`` (None: the stored input's)."""
        if view is None or view == self.view:
            return tuple(self.input_shape)
        if self.views is None:
            raise ConfigError(
                f"{where}={view!r}: dataset {self.name!r} has one view, {self.view!r}; derive others "
                "under data.views: {NAME: {source, transform, params}}"
            )
        self.views.check(view, where)
        return self.views.shapes[view]

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """``(mean, std)`` to pass as ``BatchLoader(normalize=...)``, or None."""
        if self.mean is None or self.std is None:
            return None
        return self.mean, self.std


def check_label_range(bundle: DataBundle) -> None:
    """Every label of the in-memory splits is a class ``0..num_classes-1`` or ``UNLABELED`` (-1).

    Raises:
        ConfigError: Naming the dataset, the split, the bad label and the valid range.
    """
    k = bundle.info.num_classes
    for split in ("train", "val", "test", "transfer"):
        data = getattr(bundle, split)
        if not isinstance(data, TensorData) or not len(data):
            continue
        low, high = int(data.y.min()), int(data.y.max())
        bad = high if high >= k else (low if low < UNLABELED else None)
        if bad is not None:
            raise ConfigError(
                f"dataset {bundle.info.name!r}: {split} label {bad} is outside the class range 0..{k - 1} "
                f"(num_classes={k}; {UNLABELED} marks an unlabeled sample); fix the labels or the class count"
            )


def num_samples(data: Dataset) -> int:
    """``len(data)``: every split here is a map-style dataset, which has a length."""
    return len(data)  # type: ignore[arg-type]  # torch's Dataset does not declare __len__


def _size(data: Dataset | None) -> str:
    return "-" if data is None else str(num_samples(data))


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

    def __post_init__(self) -> None:
        check_label_range(self)

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
