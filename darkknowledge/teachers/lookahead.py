"""A live frozen teacher that runs on several upcoming batches at once.

Without a cache the teacher's forward pass runs every step. Interleaving two networks one
batch at a time is slow on CPUs: each evicts the other's data and code from the caches, and
small teacher batches use the cores poorly (on MNIST-1D a hand-written loop that alternates
a 1-D CNN teacher and an MLP student took ~1.4x the time of the two run separately). A frozen
teacher in ``eval()`` gives every sample the same output whatever batch it is in, so its
outputs for the next ``n`` batches can be computed in one call and handed out as the student
reaches each batch: the same values, with 1/n as many switches.

Tapped features must be batch-first (as the teacher-output cache also requires); a group
whose outputs are not is recomputed batch by batch.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator

import torch

from darkknowledge.data.batch import Batch, model_input
from darkknowledge.losses.base import Outputs

log = logging.getLogger(__name__)


def split_outputs(out: Outputs, sizes: list[int]) -> list[Outputs] | None:
    """Cut outputs of concatenated batches back into per-batch outputs.

    Args:
        out: Outputs of ``sum(sizes)`` samples: logits ``(N, K)`` and features ``(N, ...)``.
        sizes: Batch sizes, in order.

    Returns:
        One ``Outputs`` per batch, or None when some tensor's first dimension is not ``N``.
    """
    total = sum(sizes)
    tensors = ([out.logits] if out.logits is not None else []) + list(out.features.values())
    if any(t.ndim == 0 or t.shape[0] != total for t in tensors):
        return None
    logits = out.logits.split(sizes) if out.logits is not None else [None] * len(sizes)
    features = {k: v.split(sizes) for k, v in out.features.items()}
    return [Outputs(logits=logits[i], features={k: f[i] for k, f in features.items()}) for i in range(len(sizes))]


class TeacherAhead:
    """Hands out teacher outputs computed ``batches`` batches at a time.

    Args:
        teacher: Inputs ``(B, ...)`` -> ``Outputs`` (e.g. a ``FrozenTeacher``).
        batches: How many batches to run through the teacher together (1 = one at a time).

    Example:
        >>> ahead = TeacherAhead(frozen, 4)
        >>> for batch in ahead.wrap(loader):
        ...     outputs = ahead.take(batch)  # the same as frozen(batch.x)
    """

    def __init__(self, teacher: Callable[[torch.Tensor], Outputs], batches: int) -> None:
        if batches < 1:
            raise ValueError(f"batches must be >= 1 (got {batches})")
        self.teacher = teacher
        self.batches = batches
        # id(batch) -> (batch, outputs); holding the batch keeps its id from being reused
        self._ready: dict[int, tuple[Batch, Outputs]] = {}
        self._older: dict[int, tuple[Batch, Outputs]] = {}
        self._one_by_one = False  # set when outputs turn out not to be batch-first

    def wrap(self, stream: Iterable[Batch]) -> Iterator[Batch]:
        """Yield ``stream``'s batches; before each group of ``batches`` the teacher runs once.

        Outputs are kept until taken or until the group after next is computed, so a wrapper
        around this one (another teacher's, pulling its own groups) still finds them.
        """
        it = iter(stream)
        self._ready, self._older = {}, {}
        while group := list(itertools.islice(it, self.batches)):
            self._older = self._ready
            self._ready = {id(b): (b, out) for b, out in zip(group, self._outputs(group))}
            yield from group

    def _outputs(self, group: list[Batch]) -> list[Outputs]:
        if len(group) > 1 and not self._one_by_one:
            inputs = torch.cat([model_input(b, self.teacher) for b in group])  # the view the teacher reads
            parts = split_outputs(self.teacher(inputs), [len(b) for b in group])
            if parts is not None:
                return parts
            log.warning("teacher outputs are not batch-first; running the teacher one batch at a time")
            self._one_by_one = True
        return [self.teacher(model_input(b, self.teacher)) for b in group]

    def take(self, batch: Batch) -> Outputs | None:
        """The teacher's outputs for ``batch`` if they were computed ahead (once), else None."""
        for ready in (self._ready, self._older):
            entry = ready.pop(id(batch), None)
            if entry is not None:
                return entry[1]
        return None


AUTO_MAX_BATCHES = 4
AUTO_MAX_INPUT_BYTES = 1 << 20
"""Automatic grouping on CPU: up to 4 batches while their inputs total at most 1 MiB. Small
inputs mean small activations, where per-call overhead and switching networks dominate
(MNIST-1D: 4 x 20 KB); with image batches (CIFAR: 1.5 MB per batch of 128) a larger teacher
batch spills the caches and is slower (resnet56 on 4 batches took ~1.3x longer per epoch)."""


def live_batches(configured: int | None, batch: Batch) -> int:
    """Batches a live teacher runs on at once.

    Args:
        configured: ``cache.live_batches`` (wins when set).
        batch: A training batch (its inputs' device and size).

    Returns:
        ``configured``; else on CPU as many batches (at most 4) as fit 1 MiB of inputs, and 1
        on accelerators (where a larger teacher batch costs memory the user sized the batch for).
    """
    if configured is not None:
        return configured
    if batch.x.device.type != "cpu":
        return 1
    per_batch = batch.x.numel() * batch.x.element_size()
    return max(1, min(AUTO_MAX_BATCHES, AUTO_MAX_INPUT_BYTES // max(1, per_batch)))
