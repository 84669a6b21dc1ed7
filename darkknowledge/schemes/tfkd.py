"""Teacher-free KD with a manually designed (virtual) teacher: Tf-KD_reg.

Yuan, Tay, Li, Wang & Feng, "Revisiting Knowledge Distillation via Label Smoothing
Regularization", CVPR 2020 (arXiv:1909.11723; "Revisit KD: a Teacher-free Framework"),
Sec. 5 (Tf-KD_reg). The student minimises ``(1 - alpha) * H(q, p) + alpha * D_KL(p^d_T, p)``
against the virtual teacher ``p^d`` (``a`` on the correct class, the rest uniform, softened at
``T``; see :mod:`darkknowledge.teachers.virtual`, which follows the official code).

Plan: the student is taught by the :class:`~darkknowledge.teachers.virtual.Virtual` teacher
through the recipe's ``losses``. The official code's loss (``loss_kd_regularization``: the
student not softened, no ``T^2``, ``nn.KLDivLoss()`` averaged over B*K entries and scaled by
``multiplier``) is, with our per-sample KL::

    losses:
      ce: {weight: 0.9}                                   # 1 - alpha
      tf_reg: {loss: kd, T: 1.0, alpha: 1.0, weight: 0.1} # alpha * multiplier / K (official CIFAR-100: 0.1 * 100 / 100)

with ``scheme.params: {a: 0.99, T: 20}`` (the official CIFAR-100 ResNet18 setting).
Tf-KD_self (a pre-trained copy of the student teaches it) is ``born_again`` with
``generations: 1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import Field

from darkknowledge.schemes.base import Scheme, SchemeParams, register_scheme
from darkknowledge.schemes.task import FlowTask
from darkknowledge.schemes.wiring import require_teacher_terms, taught
from darkknowledge.teachers.flow import Flow
from darkknowledge.teachers.virtual import Virtual

if TYPE_CHECKING:
    from darkknowledge.schemes.context import Context


class TfKDParams(SchemeParams):
    """``scheme.params`` of ``tfkd``: the virtual teacher."""

    a: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        default=0.99,
        description="probability of the correct class in the virtual teacher (official: 0.99; paper 0.9-0.99)",
    )
    T: Annotated[float, Field(gt=0.0)] = Field(
        default=20.0, description="temperature that softens the virtual teacher (official CIFAR-100: 20)"
    )


@register_scheme("tfkd")
class TfKD(Scheme):
    """Tf-KD_reg: a hand-made virtual teacher (``a`` on the true class) regularises the student."""

    citation = "Yuan et al., Revisiting Knowledge Distillation via Label Smoothing Regularization (Tf-KD), CVPR 2020."
    summary = "a manually designed virtual teacher (a on the true class, uniform rest) teaches the student"
    example: ClassVar[dict[str, Any]] = {
        "teacher": None,
        "losses": {"ce": {"weight": 0.5}, "tf_reg": {"loss": "kd", "T": 1.0, "alpha": 1.0, "weight": 0.5}},
    }
    Params = TfKDParams
    moved = {
        "alpha": "the weights are the losses': ce: {weight: 1 - alpha}, tf_reg: {loss: kd, T: 1, alpha: 1, "
        "weight: alpha * multiplier}",
        "multiplier": "the scale of the term is its weight: losses.tf_reg.weight (alpha * multiplier)",
    }

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> FlowTask:
        """The recipe's student (seed's init), taught by the virtual teacher ``(a, T)``."""
        require_teacher_terms(ctx.objective(), "tfkd", "tf_reg: {loss: kd, T: 1, alpha: 1, weight: 0.1}")
        student = ctx.student(seed)
        flow = Flow({"student": student}, taught("student", ctx.objective, [Virtual(params.a, params.T)]))
        return FlowTask(flow, {"student": flow.view_model("student")})
