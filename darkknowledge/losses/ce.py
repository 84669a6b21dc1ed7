"""Cross-entropy with the ground-truth labels (the student's own supervised term).

On a classifier: logits ``(B, K)``, labels ``(B,)``. On a language model: next-token targets
``(B, L)`` (``-1`` at ignored positions) against logits ``(B, L, V)`` or the model's lazy logits
(:class:`~darkknowledge.lm.targets.LazyLogits`), computed a chunk of positions at a time like the
token divergences.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.errors import ConfigError
from darkknowledge.lm.targets import LazyLogits
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import DistillLoss, Needs, Outputs, class_logits
from darkknowledge.losses.token_chunks import chunked_sum
from darkknowledge.losses.tokens import DEFAULT_CHUNK, chunk_rows


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
        if isinstance(student.tokens, LazyLogits) or (student.logits is not None and student.logits.ndim > 2):
            return self.sequence_cross_entropy(student, batch)
        return cross_entropy(class_logits(student, "loss 'ce'"), batch.y, self.label_smoothing, batch.labeled)

    def sequence_cross_entropy(self, student: Outputs, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy over the kept positions, chunked (see the module docstring)."""
        if self.label_smoothing:
            raise ConfigError(
                f"losses.ce.label_smoothing={self.label_smoothing}: not supported on a language model's tokens; use 0"
            )
        dist = student.tokens if isinstance(student.tokens, LazyLogits) else class_logits(student, "loss 'ce'")
        return sequence_cross_entropy(dist, batch.y)


def sequence_cross_entropy(
    dist: torch.Tensor | LazyLogits, y: torch.Tensor, chunk_size: int | Literal["auto"] | None = DEFAULT_CHUNK
) -> torch.Tensor:
    """``-log p_s(y_t)`` averaged over the positions with ``y_t != -1``, a chunk of positions at a time.

    Args:
        dist: Logits ``(B, L, V)`` or LazyLogits over ``(B, L)`` positions.
        y: Next-token targets ``(B, L)``, ``-1`` at ignored positions.
        chunk_size: Tokens per chunk (see ``losses.tokens.chunk_rows``); one chunk's ``(c, V)`` is alive
            at a time (``losses.token_chunks.chunked_sum``).

    Returns:
        Scalar; 0 (attached to the graph) when no position is kept.
    """
    head = dist.head if isinstance(dist, LazyLogits) else None
    vocab = dist.vocab if isinstance(dist, LazyLogits) else int(dist.shape[-1])
    flat = dist.rows() if isinstance(dist, LazyLogits) else dist.reshape(-1, vocab)  # (N, d) or (N, V)
    targets = y.reshape(-1).to(flat.device)  # (N,)
    keep = (targets != UNLABELED).nonzero().squeeze(1)  # (n,)
    if keep.numel() == 0:
        return flat.sum().float() * 0.0
    rows, targets = flat.index_select(0, keep), targets.index_select(0, keep)  # (n, d|V), (n,)

    def part(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = h if head is None else head(h)  # (c, V)
        return F.cross_entropy(z.float(), t, reduction="sum")

    return chunked_sum(part, rows, targets, chunk_rows(chunk_size, vocab), head) / len(keep)
