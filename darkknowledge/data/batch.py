"""The batch that flows through every scheme: inputs, labels and sample indices."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    """

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    view: torch.Tensor | None = None
    labeled: bool = False
    host_idx: torch.Tensor | None = None
    host_view: torch.Tensor | None = None

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
        )

    def __len__(self) -> int:
        return int(self.y.shape[0])
