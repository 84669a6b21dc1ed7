"""Residual knowledge distillation: an assistant learns the teacher-student feature residual.

Gao, Shen, Li & Loy, "Residual Knowledge Distillation", arXiv:2002.09168, 2020. The student
S mimics the teacher T's feature map, and an assistant A learns the residual error between
them, so that S and A together approximate T's feature (the abstract: "S is trained to mimic
the feature maps of T, and A aids this process by learning the residual error between them")::

    L_S = || F_T - F_S ||^2                      (S mimics T's feature)
    L_A = || sg(F_T - F_S) - F_A ||^2            (A learns the residual; sg = stop-gradient)
    inference: logits = C_T(F_S + F_A)           (the sum goes through T's classifier)

Our reading, documented where the paper leaves freedom (we could consult its abstract, not
its full text):

* The feature is the penultimate one (``fc:input`` of both zoo models). ``F_S`` is the
  student's feature through a linear ``connector`` into the teacher's width (a FitNets-style
  regressor), part of the deployed pair.
* ``C_T`` is a frozen copy of the teacher's classifier ``fc`` (the summed feature lives in
  the teacher's feature space, so its classifier applies unchanged).
* S and A are trained jointly in one stage (the residual target is detached, so A never
  pushes S). Plan: the views ``student`` (the trunk with its own head) and ``pair``; the frozen
  teacher teaches ``student`` the recipe's ``losses`` and ``pair`` the mimic term ``L_S``
  (``fitnet`` without regressor between the connector and the teacher's feature); the
  :class:`~darkknowledge.teachers.residual.ResidualTarget` ``sg(F_T - F_S)`` teaches the
  assistant ``L_A`` (the same loss). The student's own head (its original ``fc``, outside the pair) is trained with
  the recipe's ``losses`` (e.g. KD) on the same trunk, so the student alone stays deployable
  and is a report row (``student_alone``), as is ``without_assistant`` = ``C_T(F_S)``.
* The paper's channel split of one given network into S and A (equal total cost) is not
  reproduced: the assistant is any zoo model; the report lists the pair's parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from darkknowledge.config import ModelConfig
from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses.base import Outputs
from darkknowledge.losses.objective import Objective
from darkknowledge.models import create_model
from darkknowledge.models.residual_pair import ResidualPair
from darkknowledge.schemes.base import Scheme, SchemeParams, register_scheme
from darkknowledge.schemes.task import FlowTask
from darkknowledge.schemes.wiring import taught
from darkknowledge.teachers.flow import Flow, Link
from darkknowledge.teachers.frozen import Frozen
from darkknowledge.teachers.residual import ResidualTarget

if TYPE_CHECKING:
    from darkknowledge.schemes.context import Context

FEATURE = "fc:input"


class _View(nn.Module):
    """Evaluation view of the pair without the assistant: the student alone (its own head) or
    ``fc_T(connector(student feature))``.

    Kept outside the trainable module (a plain attribute of the scheme), so its shared
    submodules are never seen twice by the optimizer.
    """

    def __init__(self, pair: ResidualPair, head: nn.Linear, own_head: bool, name: str) -> None:
        super().__init__()
        self.student = pair.student
        if own_head:
            self.head = head
        else:
            self.connector, self.fc = pair.connector, pair.fc
        self.own_head = own_head
        self.dk_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.student(x).flatten(1)  # (B, d)
        return self.head(h) if self.own_head else self.fc(self.connector(h))  # (B, K)


class ResidualFlow(Flow):
    """The pair (trunk, connector, assistant; the teacher's frozen ``fc``) and the student's own head:
    one forward gives the views ``student`` (trunk + own head) and ``pair`` (``fc(F_S + F_A)``)."""

    pair: ResidualPair  # views and extra modules are registered under their names
    head: nn.Linear

    def __init__(self, pair: ResidualPair, head: nn.Linear, links: list[Any]) -> None:
        super().__init__({"pair": pair}, links, tap_models={"student": pair.student}, extra={"head": head})

    def compute_views(self, batch: Batch) -> dict[str, Outputs]:
        taps = [t for t in (self.taps.get("student"), self.taps.get("pair")) if t is not None]
        for t in taps:
            t.active = True
        try:
            h, f_s, f_a = self.pair.parts(batch.x)  # (B, d), (B, D), (B, D)
        finally:
            for t in taps:
                t.active = False
        trunk, pair = self.taps.get("student"), self.taps.get("pair")
        return {
            "student": Outputs(logits=self.head(h), features=trunk.pop() if trunk is not None else {}),
            "pair": Outputs(logits=self.pair.fc(f_s + f_a), features=pair.pop() if pair is not None else {}),
        }


def mimic_objective(name: str, student_tap: str, weight: float) -> Objective:
    """``weight * mean (F - target)^2`` between a pair feature and the teacher's (no regressor)."""
    return Objective.from_config(
        {
            name: {
                "loss": "fitnet",
                "regressor": False,
                "relu": False,
                "weight": weight,
                "student_taps": [student_tap],
                "teacher_taps": [FEATURE],
            }
        },
        where="scheme.params",
    )


def residual_task(
    teacher: nn.Module | Frozen,
    student: nn.Module,
    assistant: dict[str, Any],
    objective: Any,
    beta: float = 1.0,
    gamma: float = 1.0,
    pair_ce: float = 0.0,
    seed: int | None = None,
) -> FlowTask:
    """The plan from a trained teacher, a student and an assistant spec.

    Args:
        teacher: The trained teacher (with a Linear ``fc``), or it as a frozen teacher.
        student: The student (its trunk and own head go into the pair; weights copied).
        assistant: Zoo spec ``{name, params}`` of the assistant.
        objective: The student's objective (or a callable making it), taught by the teacher.
        beta: Weight of the mimic loss ``L_S``.
        gamma: Weight of the residual loss ``L_A``.
        pair_ce: Weight of cross-entropy on the pair's logits (0: the paper's losses only).
        seed: Seeds the new modules (connector, assistant).
    """
    frozen = teacher if isinstance(teacher, Frozen) else Frozen(teacher, "teacher")
    fc = getattr(frozen.model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ShapeError(
            f"residual: the teacher {getattr(frozen.model, 'dk_name', type(frozen.model).__name__)!r} has "
            "no Linear `fc` classifier; its input is the feature the assistant completes"
        )
    head = getattr(student, "fc", None)
    if not isinstance(head, nn.Linear):
        raise ShapeError(
            f"residual: the student {getattr(student, 'dk_name', type(student).__name__)!r} has no "
            "Linear `fc` classifier"
        )
    shape = getattr(student, "dk_params", {}).get("input_shape")  # absent: the builders' default
    dims = {"input_shape": tuple(shape)} if shape else {}
    s_spec = {
        "name": student.dk_name,
        "params": {
            k: v for k, v in getattr(student, "dk_params", {}).items() if k not in ("num_classes", "input_shape")
        },
    }
    if seed is not None:
        torch.manual_seed(seed)
    pair = create_model(
        "residual_pair",
        num_classes=int(fc.out_features),
        **dims,
        student=s_spec,
        assistant=assistant,
        feature_dim=int(fc.in_features),
    )
    assert isinstance(pair, ResidualPair)
    pair.student.load_state_dict({k: v for k, v in student.state_dict().items() if not k.startswith("fc.")})
    pair.fc.load_state_dict(fc.state_dict())
    pair.fc.requires_grad_(False)
    make = objective if callable(objective) and not isinstance(objective, nn.Module) else (lambda: objective)
    links: list[Any] = taught("student", make, [frozen])
    links.append(Link("pair", mimic_objective("mimic", "connector", beta), frozen, where="scheme.params.beta"))
    links.append(
        Link(
            "pair",
            mimic_objective("residual", "assistant", gamma),
            ResidualTarget(frozen, "pair", "connector", FEATURE),
            where="scheme.params.gamma",
        )
    )
    if pair_ce > 0:
        links.append(
            Link(
                "pair",
                Objective.from_config({"pair_ce": {"loss": "ce", "weight": pair_ce}}),
                where="scheme.params.pair_ce",
            )
        )
    flow = ResidualFlow(pair, head, links)
    name = getattr(pair, "dk_params", {}).get("student", {}).get("name", "student")
    evaluate = {
        "pair": pair,
        "student_alone": _View(pair, head, own_head=True, name=name),
        "without_assistant": _View(pair, head, own_head=False, name="student+connector+fc_T"),
    }
    return FlowTask(flow, evaluate, primary="pair", export=pair)


class ResidualParams(SchemeParams):
    """``scheme.params`` of ``residual``."""

    assistant: ModelConfig | None = Field(
        default=None,
        description="zoo spec of the assistant (default: mlp, "
        "hidden [64]); its output width is set to the teacher's feature width",
    )
    beta: Annotated[float, Field(ge=0.0)] = Field(default=1.0, description="weight of the student's mimic loss L_S")
    gamma: Annotated[float, Field(ge=0.0)] = Field(
        default=1.0, description="weight of the assistant's residual loss L_A"
    )
    pair_ce: Annotated[float, Field(ge=0.0)] = Field(
        default=0.0, description="weight of cross-entropy on the pair's logits (0 = the paper's losses only)"
    )


@register_scheme("residual")
class Residual(Scheme):
    """Student mimics the teacher's feature; an assistant learns the remaining residual; both are deployed."""

    pretrained_teacher = True

    default_transfer = True
    citation = "Gao, Shen, Li, Loy. Residual Knowledge Distillation. arXiv:2002.09168, 2020."
    summary = (
        "student mimics the teacher's feature, an assistant learns the (detached) residual; fc_T(S + A) at inference"
    )
    report_notes: ClassVar[tuple[str, ...]] = (
        "residual: the student row is the pair fc_T(connector(S) + A); ':student_alone' is the student's own head, "
        "':without_assistant' is fc_T(connector(S)), i.e. what the assistant adds",
    )
    Params = ResidualParams

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> FlowTask:
        """The pair for ``seed``: the recipe student (baseline init), an assistant, the teacher's classifier."""
        teacher = ctx.frozen(ctx.teacher(), "teacher")
        spec = params.assistant or ModelConfig(name="mlp", params={"hidden": [64]})
        return residual_task(
            teacher,
            ctx.student(seed),
            spec.model_dump(include={"name", "params"}),
            ctx.objective,
            beta=params.beta,
            gamma=params.gamma,
            pair_ce=params.pair_ce,
            seed=seed,
        )
