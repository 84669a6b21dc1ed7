"""The residual a student has not matched yet: a teacher feature minus the student's, detached.

Gao, Shen, Li & Loy, "Residual Knowledge Distillation", arXiv:2002.09168, 2020: an assistant
learns the residual error between the teacher's feature and the student's, ``sg(F_T - F_S)``
(``sg``: stop-gradient). As a teacher it gives that residual as its feature at the teacher's
path, so a feature loss (``fitnet`` without regressor) trains the assistant towards it.
"""

from __future__ import annotations

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses.base import Outputs
from darkknowledge.teachers.base import Teacher, Views
from darkknowledge.teachers.frozen import Frozen


class ResidualTarget(Teacher):
    """``sg(F_T - F_S)``: the frozen teacher's feature at ``feature`` minus a view's feature at ``tap``.

    Args:
        teacher: The frozen teacher (gives ``F_T`` at ``feature``).
        view: The trainable view whose feature at ``tap`` is ``F_S`` (in the teacher's space).
        tap: The view's tap path of ``F_S``.
        feature: The teacher's tap path of ``F_T``; the residual is given under this path.
    """

    logits = False
    standalone = False

    def __init__(self, teacher: Frozen, view: str, tap: str, feature: str) -> None:
        super().__init__()
        self.teacher, self.view, self.tap, self.feature = teacher, view, tap, feature
        self.model = teacher.model
        self.name = f"residual of {view!r}"
        teacher.request(False, (feature,))

    @property
    def kind(self) -> str:
        return f"the residual {self.teacher.name}:{self.feature} - {self.view}:{self.tap} (detached)"

    def members(self) -> list[Teacher]:
        return [self.teacher]

    def view_taps(self) -> dict[str, tuple[str, ...]]:
        return {self.view: (self.tap,)}

    def __call__(self, batch: Batch, views: Views | None = None) -> Outputs:
        assert views is not None
        f_t = self.teacher(batch, views).feature(self.feature).flatten(1)  # (B, D)
        f_s = views[self.view].feature(self.tap).flatten(1)  # (B, D)
        if f_s.shape != f_t.shape:
            raise ShapeError(
                f"residual: the teacher feature {self.feature!r} {tuple(f_t.shape)} and the student "
                f"feature {self.tap!r} {tuple(f_s.shape)} differ in shape"
            )
        return Outputs(logits=None, features={self.feature: (f_t.to(f_s.dtype) - f_s).detach()})
