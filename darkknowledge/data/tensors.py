"""A dataset held as tensors in memory (inputs, labels, optional paired views), indexed per batch by the loader."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from darkknowledge.data.batch import UNLABELED
from darkknowledge.errors import ConfigError


class TensorData(Dataset):
    """A dataset held as two tensors; the loader indexes them directly per batch.

    Args:
        x: Inputs ``(N, *input_shape)``; ``uint8`` images ``(N, C, H, W)`` are kept as
            ``uint8`` to save memory (the loader scales them to ``[0, 1]``); ``int64`` inputs
            are token ids ``(N, L)`` for a model with an embedding (delivered as ``int64``, never
            augmented or normalised); anything else should be floating point.
        y: Integer labels ``(N,)``, cast to ``int64``; ``UNLABELED`` (-1) marks samples
            without a label.
        views: Further inputs of the same samples in other modalities (a paired dataset),
            by name, each ``(N, *view_shape)``: e.g. ``{"depth": ...}`` beside an RGB ``x``.
            They are delivered as float, neither augmented nor normalised (store them ready).

    Raises:
        ConfigError: Mismatched lengths, non-integer labels or labels below -1.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, views: dict[str, torch.Tensor] | None = None) -> None:
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
            raise ConfigError(
                f"label {lowest} is not a class index: labels must be >= 0, or {UNLABELED} for a sample without a label"
            )
        views = dict(views or {})
        for name, v in views.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(f"TensorData view name {name!r} must be a plain identifier (letters, digits, _)")
            if not isinstance(v, torch.Tensor) or v.ndim < 1 or v.shape[0] != x.shape[0]:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ConfigError(
                    f"TensorData view {name!r} needs a tensor (N, ...) with N={x.shape[0]} samples like x (got {shape})"
                )
        self.x = x
        self.y = y
        self.views = views
        """Further named inputs of each sample (a paired dataset); empty for a single view."""
        self.all_labeled = lowest != UNLABELED
        """No sample is ``UNLABELED`` (batches then say ``labeled=True``)."""
        self._copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._views_copies: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of ``x``, ``y`` and the views."""
        return sum(t.element_size() * t.numel() for t in (self.x, self.y, *self.views.values()))

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` on ``device``: copied there on the first call and kept, so every loader
        over this data (train, evaluation, cache build) shares one copy."""
        if self.x.device == device:
            return self.x, self.y
        key = str(device)
        if key not in self._copies:
            self._copies[key] = (self.x.to(device), self.y.to(device))
        return self._copies[key]

    def views_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The views on ``device`` (copied there on the first call and kept, like :meth:`on`)."""
        out = {}
        for name, v in self.views.items():
            key = f"{device}:{name}"
            if v.device == device:
                out[name] = v
                continue
            if key not in self._views_copies:
                self._views_copies[key] = v.to(device)
            out[name] = self._views_copies[key]
        return out

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
        return TensorData(self.x[indices], self.y[indices], {k: v[indices] for k, v in self.views.items()})

    def __repr__(self) -> str:
        shape = tuple(self.x.shape)
        views = "".join(f", {k}={tuple(v.shape)}" for k, v in self.views.items())
        return f"TensorData(n={len(self)}, x={shape} {self.x.dtype}{views}, labeled={self.num_labeled})"
