"""Codistillation: a large teacher and the student trained together from scratch, two ways.

Anil, Pereyra, Passos, Ormandi, Dahl & Hinton, "Large scale distributed neural network
training through online distillation", ICLR 2018 (Sec. 2, Algorithm 1). Each of the ``n``
models minimises its own loss plus a distillation term towards the average prediction of
the others, switched on only after a burn-in::

    L_i = CE(y, F_i(x)) + weight * [t >= burn_in] * psi( 1/(n-1) sum_{j != i} F_j(x), F_i(x) )

with the others' predictions treated as constants. Here ``n = 2`` (the student and the
recipe's ``teacher:`` architecture, both freshly initialised) and ``psi`` is
:func:`~darkknowledge.losses.kd.kd_soft_loss` (``T^2 KL``, which differs from the soft-target
cross-entropy only by the constant entropy of the target), so after the burn-in this is deep
mutual learning (Zhang et al., CVPR 2018) between a large and a small model.

Differences from the paper: Anil et al. exchange *stale* checkpoints between workers that
train on different data shards (to save communication); here both models see the same batch
and read each other's current predictions (detached), as in DML. ``burn_in`` is measured in
epochs (the paper counts steps). The teacher's ``train:`` settings and ``checkpoint`` of the
recipe are not used: the teacher is an architecture only, trained in the same stage with the
student's optimizer settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, ClassVar

from pydantic import Field
from torch import nn

from darkknowledge.errors import ConfigError
from darkknowledge.schemes import register_scheme
from darkknowledge.schemes.cohort import CohortScheme, peer_seed
from darkknowledge.schemes.mutual import MutualCohort

if TYPE_CHECKING:
    from darkknowledge.schemes.context import SchemeContext


@register_scheme("codistill")
class Codistill(CohortScheme):
    """Online two-way distillation between a student and a large teacher, after a burn-in.

    Args:
        student: The small model (primary, exported).
        teacher: The large model, trained from scratch in the same stage ("teacher_peer").
        T: Temperature of the KL terms.
        weight: Weight of the distillation terms.
        burn_in: Epochs of cross-entropy alone before the two-way distillation starts.
    """

    citation = ("Anil et al. Large scale distributed neural network training through online distillation. "
                "ICLR 2018; Zhang et al. Deep Mutual Learning. CVPR 2018.")
    summary = "a large teacher and the student trained together from scratch; after a burn-in each distils the other"
    report_notes: ClassVar[tuple[str, ...]] = (
        (
            "codistill: the teacher architecture is trained from scratch together with the student (row 'teacher_peer'); "
            "after the burn-in each learns CE + KL towards the other's current (detached) predictions"
        ),
    )

    def __init__(self, student: nn.Module, teacher: nn.Module, T: float = 1.0, weight: float = 1.0,
                 burn_in: float = 0.0) -> None:
        self._module = MutualCohort([student, teacher], T=T, weight=weight, burn_in=burn_in)

    def member_names(self) -> list[str]:
        return ["student", "teacher_peer"]

    def extra_eval(self) -> dict[str, nn.Module]:
        return {}

    @classmethod
    def build(
        cls,
        ctx: SchemeContext,
        seed: int,
        T: Annotated[float, Field(gt=0.0)] = 1.0,
        weight: Annotated[float, Field(ge=0.0)] = 1.0,
        burn_in: Annotated[float, Field(ge=0.0)] = 1.0,
    ) -> Codistill:
        """The recipe's student (the baseline's initialisation) and a fresh ``teacher:`` architecture.

        Args:
            ctx: The run's context.
            seed: Run seed.
            T: Softmax temperature of the KL terms.
            weight: Weight of the distillation terms.
            burn_in: Epochs of cross-entropy alone before distillation starts.
        """
        spec = ctx.cfg.teacher
        if spec is None:
            raise ConfigError("scheme 'codistill' needs a `teacher:` section naming the large model's "
                              "architecture (e.g. teacher: {name: cnn1d}); it is trained from scratch with the student")
        if spec.checkpoint:
            raise ConfigError(f"scheme 'codistill' trains the teacher from scratch, but teacher.checkpoint is "
                              f"{spec.checkpoint!r}; remove it (or use scheme 'offline' for a pre-trained teacher)")
        raw = {"name": spec.name, "params": dict(spec.params)}
        teacher = ctx.model(raw, seed=peer_seed(seed, 1), where="teacher")
        return cls(ctx.student(seed), teacher, T=T, weight=weight, burn_in=burn_in)
