"""Mean teacher: an exponential moving average (EMA) of the student's own weights teaches it.

Tarvainen & Valpola, "Mean teachers are better role models: Weight-averaged consistency
targets improve semi-supervised deep learning results", NeurIPS 2017 (arXiv:1703.01780),
Sec. 2. The teacher is the :class:`~darkknowledge.teachers.ema.EMA` of the student's weights
(updated after every optimizer step); the student minimises the recipe's ``losses`` with it as
the teacher, e.g. ``ce + w * T^2 KL(p_ema^T || p_s^T)``. The paper's consistency cost
``J = E ||f(x, theta', eta') - f(x, theta, eta)||^2`` compares the two models under
independent input noise ``eta, eta'`` (``noise``: Gaussian input noise, its std, drawn
independently for student and teacher). The consistency term also applies to the unlabelled
transfer set (the paper's semi-supervised setting), which cross-entropy ignores. A ramp-up of
the consistency weight is the term's ``warmup_epochs`` (``warmup_shape: sigmoid`` is the
paper's ramp).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field

from darkknowledge.data.batch import Batch
from darkknowledge.losses.base import Outputs
from darkknowledge.schemes.base import Scheme, SchemeParams, register_scheme
from darkknowledge.schemes.task import FlowTask
from darkknowledge.schemes.wiring import taught
from darkknowledge.taps import unwrap
from darkknowledge.teachers.ema import EMA, add_noise
from darkknowledge.teachers.flow import Flow

if TYPE_CHECKING:
    from darkknowledge.schemes.context import Context


class NoisyFlow(Flow):
    """One student view on its own noisy copy of the input."""

    def __init__(self, *args: Any, noise: float = 0.0, **kwargs: Any) -> None:
        self.noise = noise
        super().__init__(*args, **kwargs)

    def compute_views(self, batch: Batch) -> dict[str, Outputs]:
        return {"student": self.run_view("student", add_noise(batch.x, self.noise))}


class EMAParams(SchemeParams):
    """``scheme.params`` of ``ema``."""

    decay: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.99, description="EMA decay (paper: 0.99, then 0.999)"
    )
    warmup: bool = Field(default=True, description="min(decay, 1 - 1/(t+1)) as in the authors' code")
    noise: Annotated[float, Field(ge=0.0)] = Field(
        default=0.0, description="std of the Gaussian input noise, drawn independently for student and teacher"
    )
    export: Literal["student", "ema"] = Field(default="student", description="the model written to model.pt")


def ema_task(
    student: Any, make: Any, decay: float = 0.99, warmup: bool = True, noise: float = 0.0, export: str = "student"
) -> FlowTask:
    """``student`` taught by the EMA of its weights through ``make()``."""
    student = unwrap(student)
    teacher = EMA(student, decay, warmup, noise)  # copies the student before any hook is attached
    flow = NoisyFlow({"student": student}, taught("student", make, [teacher]), noise=noise)
    if export == "ema":
        return FlowTask(flow, {"ema": teacher.model, "online": student}, primary="ema")
    return FlowTask(flow, {"student": student, "ema": teacher.model})


@register_scheme("ema")
class MeanTeacher(Scheme):
    """Mean teacher: the EMA of the student's weights is its teacher (recipe's ``losses``)."""

    default_transfer = True
    citation = (
        "Tarvainen & Valpola, Mean teachers are better role models: Weight-averaged consistency "
        "targets improve semi-supervised deep learning results, NeurIPS 2017."
    )
    summary = "an exponential moving average of the student's own weights teaches the student"
    report_notes: ClassVar[tuple[str, ...]] = (
        (
            "ema: the 'ema' row is the mean teacher itself (weight average of the student, not trained by "
            "gradients); with export: ema it is the primary row and the gradient-trained network is 'online'"
        ),
    )
    example: ClassVar[dict[str, Any]] = {"teacher": None}
    Params = EMAParams

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> FlowTask:
        """The recipe's student (the baseline's init of ``seed``) and its EMA copy."""
        return ema_task(ctx.student(seed), ctx.objective, params.decay, params.warmup, params.noise, params.export)
