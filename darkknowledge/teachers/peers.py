"""Online teachers made from the task's own trainable views in the same step.

* :class:`Peer`: another trainable view's outputs, detached: the peers of a cohort in deep
  mutual learning, the deepest classifier of the student itself for its early-exit heads
  (BYOT), the gated ensemble of ONE for its members, the model's prediction on a same-class
  sample (CS-KD). Detaching makes it a constant target: the gradient of the student's loss
  reaches the student only, never the view that teaches it.
"""

from __future__ import annotations

from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import Outputs
from darkknowledge.teachers.base import Teacher, Views, detached


class Peer(Teacher):
    """The detached outputs of the trainable view ``view`` in this step.

    Args:
        view: The teaching view's name in the task.
        model: The module whose paths the teacher taps name (the view's model).
        name: How messages call it (default: the view's name).
    """

    def __init__(self, view: str, model: nn.Module | None, name: str | None = None) -> None:
        super().__init__()
        self.view, self.model, self.name = view, model, name or view

    @property
    def kind(self) -> str:
        return f"the online teacher {self.name!r} (view {self.view!r} of this step, detached)"

    def view_taps(self) -> dict[str, tuple[str, ...]]:
        return {self.view: self.taps}

    def __call__(self, batch: Batch, views: Views | None = None) -> Outputs:
        if views is None or self.view not in views:
            raise ConfigError(f"{self.kind} needs this step's outputs of view {self.view!r}")
        return detached(views[self.view], self.need_logits, self.taps)
