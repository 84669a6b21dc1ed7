"""Codistillation: a large teacher and the student trained together from scratch, two ways.

Anil, Pereyra, Passos, Ormandi, Dahl & Hinton, "Large scale distributed neural network
training through online distillation", ICLR 2018 (Sec. 2, Algorithm 1). Each of the ``n``
models minimises its own loss plus a distillation term towards the average prediction of
the others, switched on only after a burn-in::

    L_i = CE(y, F_i(x)) + [t >= burn_in] * psi( 1/(n-1) sum_{j != i} F_j(x), F_i(x) )

with the others' predictions treated as constants. Here ``n = 2`` (the student and the
recipe's ``teacher:`` architecture, both freshly initialised): deep mutual learning (Zhang et
al., CVPR 2018) between a large and a small model (:func:`~darkknowledge.schemes.mutual.mutual_task`).
``psi`` is the recipe's teacher terms (``kd: {alpha: 1}``: ``T^2 KL``, which differs from the
soft-target cross-entropy only by the constant entropy of the target), and the burn-in is
their schedule, ``start_epoch``.

Differences from the paper: Anil et al. exchange *stale* checkpoints between workers that
train on different data shards (to save communication); here both models see the same batch
and read each other's current predictions (detached), as in DML. The burn-in is measured in
epochs (the paper counts steps). The teacher's ``train:`` settings and ``checkpoint`` of the
recipe are not used: the teacher is an architecture only, trained in the same stage with the
student's optimizer settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from darkknowledge.errors import ConfigError
from darkknowledge.schemes.base import Scheme, register_scheme
from darkknowledge.schemes.cohort import COHORT_MOVED, peer_seed
from darkknowledge.schemes.mutual import mutual_task
from darkknowledge.schemes.task import FlowTask

if TYPE_CHECKING:
    from darkknowledge.schemes.context import Context


@register_scheme("codistill")
class Codistill(Scheme):
    """Online two-way distillation between a student and a large teacher, after a burn-in."""

    citation = (
        "Anil et al. Large scale distributed neural network training through online distillation. "
        "ICLR 2018; Zhang et al. Deep Mutual Learning. CVPR 2018."
    )
    summary = "a large teacher and the student trained together from scratch; after a burn-in each distils the other"
    report_notes: ClassVar[tuple[str, ...]] = (
        (
            "codistill: the teacher architecture is trained from scratch together with the student "
            "(row 'teacher_peer'); each learns the recipe's losses from the other's current (detached) "
            "predictions, the teacher terms after their start_epoch (the burn-in)"
        ),
    )
    moved = COHORT_MOVED

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> FlowTask:
        """The recipe's student (the baseline's initialisation) and a fresh ``teacher:`` architecture."""
        spec = ctx.cfg.teacher
        if spec is None:
            raise ConfigError(
                "scheme 'codistill' needs a `teacher:` section naming the large model's "
                "architecture (e.g. teacher: {name: cnn1d}); it is trained from scratch with the student"
            )
        if spec.checkpoint:
            raise ConfigError(
                f"scheme 'codistill' trains the teacher from scratch, but teacher.checkpoint is "
                f"{spec.checkpoint!r}; remove it (or use scheme 'offline' for a pre-trained teacher)"
            )
        teacher = ctx.model({"name": spec.name, "params": dict(spec.params)}, seed=peer_seed(seed, 1), where="teacher")
        return mutual_task(ctx, [ctx.student(seed), teacher], ["student", "teacher_peer"], ensemble=False)
