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

from darkknowledge.data.batch import Batch
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
        self._ready: dict[int, Outputs] = {}
        self._one_by_one = False  # set when outputs turn out not to be batch-first

    def wrap(self, stream: Iterable[Batch]) -> Iterator[Batch]:
        """Yield ``stream``'s batches; before each group of ``batches`` the teacher runs once."""
        it = iter(stream)
        while group := list(itertools.islice(it, self.batches)):
            self._ready = dict(zip(map(id, group), self._outputs(group)))
            yield from group
        self._ready = {}

    def _outputs(self, group: list[Batch]) -> list[Outputs]:
        if len(group) > 1 and not self._one_by_one:
            parts = split_outputs(self.teacher(torch.cat([b.x for b in group])), [len(b) for b in group])
            if parts is not None:
                return parts
            log.warning("teacher outputs are not batch-first; running the teacher one batch at a time")
            self._one_by_one = True
        return [self.teacher(b.x) for b in group]

    def take(self, batch: Batch) -> Outputs | None:
        """The teacher's outputs for ``batch`` if they were computed ahead (once), else None."""
        return self._ready.pop(id(batch), None)
