"""The batch that flows through every scheme: inputs, labels and sample indices."""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNLABELED = -1
"""Label value of samples without a label (an unlabeled transfer set); CE ignores them."""


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
    """

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    view: torch.Tensor | None = None
    labeled: bool = False

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move every tensor to ``device``."""
        return Batch(
            self.x.to(device, non_blocking=non_blocking),
            self.y.to(device, non_blocking=non_blocking),
            self.idx.to(device, non_blocking=non_blocking),
            None if self.view is None else self.view.to(device, non_blocking=non_blocking),
            self.labeled,
        )

    def __len__(self) -> int:
        return int(self.y.shape[0])
