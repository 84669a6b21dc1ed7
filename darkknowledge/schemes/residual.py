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
  pushes S). The student's own head (its original ``fc``, outside the pair) is trained with
  the recipe's ``losses`` (e.g. KD) on the same trunk, so the student alone stays deployable
  and is a report row (``student_alone``), as is ``without_assistant`` = ``C_T(F_S)``.
* The paper's channel split of one given network into S and A (equal total cost) is not
  reproduced: the assistant is any zoo model; the report lists the pair's parameters.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

import darkknowledge.models.residual_pair  # noqa: F401 - registers the `residual_pair` zoo model
from darkknowledge.config import ModelConfig
from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.ce import cross_entropy
from darkknowledge.losses.objective import Objective
from darkknowledge.models import count_params, create_model
from darkknowledge.models.residual_pair import ResidualPair
from darkknowledge.schemes import register_scheme
from darkknowledge.schemes.base import Scheme
from darkknowledge.taps import FeatureTaps, validate_taps
from darkknowledge.teachers.frozen import FrozenTeacher

if TYPE_CHECKING:
    from darkknowledge.schemes.context import SchemeContext

FEATURE = "fc:input"


def residual_losses(f_s: torch.Tensor, f_a: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's mimic loss and the assistant's residual loss.

    Args:
        f_s: Student feature in the teacher's space ``(B, D)``.
        f_a: Assistant output ``(B, D)``.
        f_t: Teacher feature ``(B, D)``; a constant.

    Returns:
        ``mimic = mean (f_t - f_s)^2`` (gradient to the student only) and
        ``residual = mean (sg(f_t - f_s) - f_a)^2`` (gradient to the assistant only).
    """
    if f_s.shape != f_t.shape or f_a.shape != f_t.shape:
        raise ShapeError(f"residual: feature shapes differ: student {tuple(f_s.shape)}, assistant "
                         f"{tuple(f_a.shape)}, teacher {tuple(f_t.shape)}")
    f_t = f_t.detach().to(f_s.dtype)
    mimic = F.mse_loss(f_s, f_t)
    residual = F.mse_loss(f_a, (f_t - f_s).detach())
    return mimic, residual


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


class ResidualObjective(nn.Module):
    """Trainable module: the pair (student trunk, connector, assistant; frozen ``fc``), the
    student's own head, and the student's objective (applied to trunk + head)."""

    def __init__(self, pair: ResidualPair, head: nn.Linear, objective: Objective, taps: tuple[str, ...],
                 beta: float, gamma: float, pair_ce: float) -> None:
        super().__init__()
        self.pair, self.head, self.objective = pair, head, objective
        self.beta, self.gamma, self.pair_ce = beta, gamma, pair_ce
        self.taps = FeatureTaps(pair.student, list(taps)) if taps else None
        if self.taps is not None:
            self.taps.active = False

    def student_outputs(self, x: torch.Tensor) -> tuple[Outputs, torch.Tensor, torch.Tensor]:
        if self.taps is not None:
            self.taps.active = True
        try:
            h, f_s, f_a = self.pair.parts(x)  # (B, d), (B, D), (B, D)
        finally:
            if self.taps is not None:
                self.taps.active = False
        feats = self.taps.pop() if self.taps is not None else {}
        return Outputs(logits=self.head(h), features=feats), f_s, f_a  # student logits (B, K)

    def forward(self, batch: Batch, teacher: Outputs, epoch_progress: float = 0.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student, f_s, f_a = self.student_outputs(batch.x)
        loss, terms = self.objective(student, teacher, batch, epoch_progress)
        mimic, residual = residual_losses(f_s, f_a, teacher.features[FEATURE].flatten(1))
        loss = loss + self.beta * mimic + self.gamma * residual
        terms = {**terms, "mimic": mimic.detach(), "residual": residual.detach()}
        if self.pair_ce > 0:
            pair_ce = cross_entropy(self.pair.fc(f_s + f_a), batch.y, all_labeled=batch.labeled)
            loss = loss + self.pair_ce * pair_ce
            terms["pair_ce"] = pair_ce.detach()
        return loss, terms


@register_scheme("residual")
class Residual(Scheme):
    """Student mimics the teacher's feature; an assistant learns the remaining residual; both are deployed."""

    default_transfer = True
    citation = "Gao, Shen, Li, Loy. Residual Knowledge Distillation. arXiv:2002.09168, 2020."
    summary = "student mimics the teacher's feature, an assistant learns the (detached) residual; fc_T(S + A) at inference"
    primary = "pair"
    report_notes: ClassVar[tuple[str, ...]] = (
        "residual: the student row is the pair fc_T(connector(S) + A); ':student_alone' is the student's own head, "
        "':without_assistant' is fc_T(connector(S)), i.e. what the assistant adds",
    )

    @classmethod
    def build(
        cls,
        ctx: SchemeContext,
        seed: int,
        assistant: ModelConfig | None = None,
        beta: Annotated[float, Field(ge=0.0)] = 1.0,
        gamma: Annotated[float, Field(ge=0.0)] = 1.0,
        pair_ce: Annotated[float, Field(ge=0.0)] = 0.0,
    ) -> Residual:
        """The pair for ``seed``: the recipe student (baseline init), an assistant, the teacher's classifier.

        Args:
            ctx: The run's context.
            seed: Seed of every initialisation.
            assistant: Zoo spec of the assistant (default: mlp, hidden [64]); its output width is set
                to the teacher's feature width.
            beta: Weight of the student's feature-mimic loss ``L_S``.
            gamma: Weight of the assistant's residual loss ``L_A``.
            pair_ce: Weight of cross-entropy on the pair's logits (0 = the paper's losses only).
        """
        teacher = ctx.teacher()
        student = ctx.student(seed)
        spec = assistant or ModelConfig(name="mlp", params={"hidden": [64]})
        return cls.from_models(teacher, student, spec.model_dump(exclude={"checkpoint"}), ctx.objective(),
                               beta=beta, gamma=gamma, pair_ce=pair_ce, seed=seed)

    @classmethod
    def from_models(cls, teacher: nn.Module, student: nn.Module, assistant: dict[str, Any], objective: Objective,
                    beta: float = 1.0, gamma: float = 1.0, pair_ce: float = 0.0, seed: int | None = None) -> Residual:
        """Assemble the scheme from a trained teacher, a student and an assistant spec."""
        fc = getattr(teacher, "fc", None)
        if not isinstance(fc, nn.Linear):
            raise ShapeError(f"residual: the teacher {getattr(teacher, 'dk_name', type(teacher).__name__)!r} has no "
                             "Linear `fc` classifier; its input is the feature the assistant completes")
        num_classes = int(fc.out_features)
        shape = getattr(student, "dk_params", {}).get("input_shape")  # absent: the builders' default
        dims = {"input_shape": tuple(shape)} if shape else {}
        s_spec = {"name": student.dk_name,
                  "params": {k: v for k, v in student.dk_params.items() if k not in ("num_classes", "input_shape")}}
        if seed is not None:
            torch.manual_seed(seed)
        pair = create_model("residual_pair", num_classes=num_classes, **dims, student=s_spec,
                            assistant=assistant, feature_dim=int(fc.in_features))
        head = student.fc
        if not isinstance(head, nn.Linear):
            raise ShapeError(f"residual: the student {student.dk_name!r} has no Linear `fc` classifier")
        pair.student.load_state_dict({k: v for k, v in student.state_dict().items() if not k.startswith("fc.")})
        pair.fc.load_state_dict(fc.state_dict())
        pair.fc.requires_grad_(False)
        return cls(pair, head, teacher, objective, beta=beta, gamma=gamma, pair_ce=pair_ce)

    def __init__(self, pair: ResidualPair, head: nn.Linear, teacher: nn.Module, objective: Objective,
                 beta: float = 1.0, gamma: float = 1.0, pair_ce: float = 0.0) -> None:
        """Args: the pair (its ``fc`` already the teacher's, frozen), the student's own head (the
        student's original ``fc``), the trained teacher, the student's objective and loss weights."""
        name = getattr(pair, "dk_params", {}).get("student", {}).get("name", "student")
        student = _View(pair, head, own_head=True, name=name)
        needs = objective.bind(pair.student, teacher)  # taps resolve on the trunk (its `fc` is Identity)
        validate_taps(pair.student, needs.student_taps)
        validate_taps(teacher, (*needs.teacher_taps, FEATURE))
        self.teacher = FrozenTeacher(teacher, (*needs.teacher_taps, FEATURE), need_logits=True)
        self._module = ResidualObjective(pair, head, objective, needs.student_taps, beta, gamma, pair_ce)
        self._student = student
        self._without = _View(pair, head, own_head=False, name="student+connector+fc_T")

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def pair(self) -> ResidualPair:
        return self._module.pair

    def to(self, device: torch.device) -> Residual:
        self._module.to(device)
        self.teacher.to(device)
        return self

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """Dry run: shapes of the three features, adapters of the student's objective."""
        module = self._module
        teacher = self.teacher(batch.x)
        was_training = module.training
        module.eval()
        with torch.no_grad():
            student, f_s, f_a = module.student_outputs(batch.x)
            residual_losses(f_s, f_a, teacher.features[FEATURE].flatten(1))
        info = replace(info or SetupInfo(num_samples=len(batch), batch_size=len(batch)),
                       num_classes=int(student.logits.shape[-1]))
        module.objective.setup(student, teacher, info)
        module.objective.to(batch.x.device)
        module.train(was_training)

    def teacher_outputs(self, batch: Batch) -> Outputs:
        return self.teacher(batch.x)

    def eval_models(self) -> dict[str, nn.Module]:
        return {"pair": self.pair, "student_alone": self._student, "without_assistant": self._without}

    def export_model(self) -> nn.Module:
        return self.pair

    def teacher_hash(self) -> str | None:
        return self.teacher.hash

    def describe(self) -> dict[str, Any]:
        return {"adapter_params": count_params(self._module.objective),
                "losses": [*self._module.objective.terms, "mimic", "residual"]
                + (["pair_ce"] if self._module.pair_ce > 0 else []),
                "pair_params": count_params(self.pair), "student_params": count_params(self._student)}
