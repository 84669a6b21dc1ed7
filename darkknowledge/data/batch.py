"""The batch that flows through every scheme: inputs, labels and sample indices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from darkknowledge.errors import ConfigError
from darkknowledge.taps import unwrap

UNLABELED = -1
"""Label value of samples without a label (an unlabeled transfer set); CE ignores them."""


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without blocking the host: a host tensor bound for CUDA goes
    through pinned memory (a copy from pageable memory first waits for the stream's queued
    work, which stalls a training loop that runs ahead of the GPU)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=True)


@dataclass
class Batch:
    """One mini-batch.

    Attributes:
        x: Inputs, ``(B, *input_shape)``.
        y: Integer labels ``(B,)``; ``UNLABELED`` (-1) where a sample has no label.
        idx: Index of each sample in its dataset ``(B,)`` (for memory banks and caches).
        view: Which cached augmented view of each sample ``x`` is ``(B,)``, when the loader
            replays a teacher-output cache's views; else None.
        labeled: True when every sample is known to have a label (the loader knows it from
            the dataset, without reading ``y`` on the device); cross-entropy then skips
            counting labels. False means "may contain ``UNLABELED``", never "has none".
        host_idx: ``idx`` on the CPU (the loader's own copy), for host-side lookups such as
            a memory-mapped cache without a device sync; None when unknown.
        host_view: ``view`` on the CPU likewise.
        inputs: On a paired dataset (several named views of each sample, see
            :mod:`darkknowledge.data.paired`), every view this run's models read, by name
            (``x`` is one of them: the view of the model the stage trains); None otherwise.
    """

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    view: torch.Tensor | None = None
    labeled: bool = False
    host_idx: torch.Tensor | None = None
    host_view: torch.Tensor | None = None
    inputs: dict[str, torch.Tensor] | None = None

    def input(self, name: str | None) -> torch.Tensor:
        """The inputs of view ``name`` ``(B, *view_shape)``; None: ``x``.

        Raises:
            ConfigError: The batch has no view ``name`` (e.g. a modality the split lacks).
        """
        if name is None:
            return self.x
        if self.inputs is None or name not in self.inputs:
            have = sorted(self.inputs) if self.inputs else []
            raise ConfigError(
                f"this batch has no input view {name!r} (it has {have or 'only its x'}): a model "
                "reads a view this split does not hold, or the loader was not asked for it"
            )
        return self.inputs[name]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move every tensor to ``device``."""
        return Batch(
            self.x.to(device, non_blocking=non_blocking),
            self.y.to(device, non_blocking=non_blocking),
            self.idx.to(device, non_blocking=non_blocking),
            None if self.view is None else self.view.to(device, non_blocking=non_blocking),
            self.labeled,
            self.host_idx,
            self.host_view,
            None
            if self.inputs is None
            else {k: v.to(device, non_blocking=non_blocking) for k, v in self.inputs.items()},
        )

    def __len__(self) -> int:
        return int(self.y.shape[0])


INPUT_ATTR = "dk_input"
"""Attribute naming the data view a model reads (set on paired datasets by the run's builder)."""


def input_name(model: Any) -> str | None:
    """The view ``model`` reads (``dk_input`` on the user's model under any wrapper), or None."""
    if isinstance(model, nn.Module):
        return getattr(unwrap(model), INPUT_ATTR, None)
    return getattr(model, "input", None)


def model_input(batch: Batch, model: Any) -> torch.Tensor:
    """The inputs of ``batch`` that ``model`` reads: its view on a paired dataset, else ``batch.x``."""
    return batch.input(input_name(model))
