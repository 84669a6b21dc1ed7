"""Cross-entropy with the ground-truth labels (the student's own supervised term)."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import DistillLoss, Needs, Outputs


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, all_labeled: bool = False
) -> torch.Tensor:
    """Mean cross-entropy over labelled samples; unlabelled ones (label -1) are ignored.

    Args:
        logits: ``(B, K)``.
        labels: ``(B,)`` integer classes, ``-1`` for unlabelled samples.
        label_smoothing: Mass spread uniformly over classes (0 = none).
        all_labeled: The caller knows no label is -1 (``Batch.labeled``): the plain mean,
            without counting labels (fewer ops per step; the same value).

    Returns:
        Scalar; 0 (with a gradient path) when the batch has no labelled sample.
    """
    if all_labeled and labels.numel():
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    labelled = (labels != UNLABELED).sum()  # number of labelled samples, kept on the device
    total = F.cross_entropy(logits, labels, ignore_index=UNLABELED, reduction="sum", label_smoothing=label_smoothing)
    return total / labelled.clamp(min=1)  # no host sync: a batch without labels gives 0


@register_loss("ce")
class CrossEntropy(DistillLoss):
    """Cross-entropy against labels: ``-log softmax(z_s)[y]`` averaged over labelled samples.

    Shapes: student logits ``(B, K)``, labels ``(B,)``. Needs no teacher.
    """

    knowledge = "label"
    citation = "Standard supervised cross-entropy (the student's hard-label term)."
    needs_spec = Needs(labels=True)
    search_space = {}  # the hard-label term: nothing to tune

    def __init__(self, label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        return cross_entropy(student.logits, batch.y, self.label_smoothing, batch.labeled)
