"""Mean teacher: an exponential moving average (EMA) of the student's own weights teaches it.

Tarvainen & Valpola, "Mean teachers are better role models: Weight-averaged consistency
targets improve semi-supervised deep learning results", NeurIPS 2017 (arXiv:1703.01780),
Sec. 2. After every optimizer step ``t`` the teacher's weights follow the student's:

    theta'_t = d_t * theta'_{t-1} + (1 - d_t) * theta_t,     d_t = min(decay, 1 - 1 / (t + 1))

(the ``1 - 1/(t+1)`` ramp is the authors' code: the teacher starts as a plain average; set
``warmup: false`` for a constant ``d_t = decay``). The student minimises the recipe's ``losses``
with the EMA model as the teacher, e.g. ``ce + w * T^2 KL(p_ema^T || p_s^T)``; the paper's
consistency cost ``J = E ||f(x, theta', eta') - f(x, theta, eta)||^2`` compares the two models
under independent input noise ``eta, eta'`` (``noise``: Gaussian input noise, its std). The
consistency term also applies to the unlabelled transfer set (the paper's semi-supervised
setting), which cross-entropy ignores. A ramp-up of the consistency weight is the objective's
``warmup_epochs`` (linear, where the paper uses a sigmoid ramp).

Floating-point buffers (BatchNorm running statistics) are averaged like the weights, integer
buffers are copied (as timm's ``ModelEmaV2``). The EMA copy lives in the trainable module with
``requires_grad=False``: never optimised, but checkpointed, so a resume continues it exactly.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.objective import Objective
from darkknowledge.models import count_params
from darkknowledge.schemes import register_scheme
from darkknowledge.schemes.base import Scheme
from darkknowledge.schemes.offline import StudentObjective, setup_objective
from darkknowledge.taps import FeatureTaps, unwrap, validate_taps

if TYPE_CHECKING:
    from darkknowledge.schemes.context import SchemeContext


def effective_decay(decay: float, step: int, warmup: bool = True) -> float:
    """The EMA decay ``d_t`` of update ``step`` (1-based): ``min(decay, 1 - 1/(step + 1))``, or
    ``decay`` without warm-up."""
    return min(decay, 1.0 - 1.0 / (step + 1)) if warmup else decay


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float | torch.Tensor) -> None:
    """In place: ``ema = decay * ema + (1 - decay) * model`` for every floating-point parameter
    and buffer (same architecture); integer buffers (e.g. ``num_batches_tracked``) are copied.

    Args:
        ema: The averaged copy (updated in place).
        model: The trained model.
        decay: In ``[0, 1]`` (a float or a 0-d tensor on the models' device); 0 copies ``model``,
            1 keeps ``ema``.
    """
    ours, theirs = ema.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
    if ours.keys() != theirs.keys():
        raise ShapeError("ema_update: the EMA copy and the model have different state_dict keys")
    for key, e in ours.items():
        v = theirs[key].detach()
        if e.is_floating_point():
            e.data.mul_(decay).add_(v.to(e.dtype) * (1.0 - decay))
        else:
            e.data.copy_(v)


class MeanTeacherModule(StudentObjective):
    """The student, its objective and the EMA copy (``ema``, ``requires_grad=False``).

    ``forward`` adds the student's input noise and evaluates the objective against the EMA
    outputs computed by :meth:`teacher_outputs` (under ``no_grad``, in eval mode).
    """

    def __init__(self, student: nn.Module, objective: Objective, student_taps: tuple[str, ...],
                 teacher_taps: tuple[str, ...], noise: float = 0.0) -> None:
        ema = copy.deepcopy(student)  # before any hook is attached to the student
        ema.requires_grad_(False)
        super().__init__(student, objective, student_taps)
        self.ema = ema
        self.noise = noise
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # EMA updates so far (checkpointed)
        self.ema_taps = FeatureTaps(ema, list(teacher_taps), detach=True) if teacher_taps else None
        if self.ema_taps is not None:
            self.ema_taps.active = False

    def noisy(self, x: torch.Tensor) -> torch.Tensor:
        """``x + noise * N(0, 1)`` (``x`` itself when ``noise`` is 0)."""
        return x + self.noise * torch.randn_like(x) if self.noise > 0 else x

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor, need_logits: bool = True) -> Outputs:
        """The EMA model's outputs (eval mode, no gradient) on its own noisy copy of ``x``."""
        was_training = self.ema.training
        self.ema.eval()
        if self.ema_taps is not None:
            self.ema_taps.active = True
        try:
            logits = self.ema(self.noisy(x))  # (B, K)
        finally:
            if self.ema_taps is not None:
                self.ema_taps.active = False
            self.ema.train(was_training)
        feats = self.ema_taps.pop() if self.ema_taps is not None else {}
        return Outputs(logits=logits.detach() if need_logits else None, features=feats)

    def forward(self, batch: Batch, teacher: Outputs | None, epoch_progress: float = 0.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student = self.student_outputs(self.noisy(batch.x))
        return self.objective(student, teacher, batch, epoch_progress)


@register_scheme("ema")
class MeanTeacher(Scheme):
    """Mean teacher: the EMA of the student's weights is its teacher (recipe's ``losses``).

    Args:
        student: The model to train.
        objective: The weighted loss terms (the EMA model is their teacher).
        decay: EMA decay (paper: 0.99 during ramp-up, 0.999 after).
        warmup: Use ``min(decay, 1 - 1/(t+1))`` (the authors' code) instead of a constant decay.
        noise: Std of the Gaussian input noise, drawn independently for student and teacher.
        export: ``student`` (the trained network) or ``ema`` (the mean teacher) as ``model.pt``.
    """

    default_transfer = True
    citation = ("Tarvainen & Valpola, Mean teachers are better role models: Weight-averaged consistency "
                "targets improve semi-supervised deep learning results, NeurIPS 2017.")
    summary = "an exponential moving average of the student's own weights teaches the student"
    report_notes: ClassVar[tuple[str, ...]] = (
        ("ema: the 'ema' row is the mean teacher itself (weight average of the student, not trained by "
         "gradients); with export: ema it is the primary row and the gradient-trained network is 'online'"),
    )

    @classmethod
    def build(
        cls,
        ctx: SchemeContext,
        seed: int,
        decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.99,
        warmup: bool = True,
        noise: Annotated[float, Field(ge=0.0)] = 0.0,
        export: Literal["student", "ema"] = "student",
    ) -> MeanTeacher:
        """The recipe's student (the baseline's init of ``seed``), objective and EMA copy."""
        return cls(ctx.student(seed), ctx.objective(), decay=decay, warmup=warmup, noise=noise, export=export)

    def __init__(self, student: nn.Module, objective: Objective, decay: float = 0.99, warmup: bool = True,
                 noise: float = 0.0, export: Literal["student", "ema"] = "student") -> None:
        if export not in ("student", "ema"):
            raise ValueError(f"ema: export must be 'student' or 'ema', got {export!r}")
        student = unwrap(student)
        needs = objective.bind(student, student)  # the teacher has the student's architecture
        validate_taps(student, needs.student_taps)
        validate_taps(student, needs.teacher_taps)
        self.needs, self.decay, self.warmup, self.export = needs, decay, warmup, export
        self.primary = export
        self._module = MeanTeacherModule(student, objective, needs.student_taps, needs.teacher_taps, noise)

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def student(self) -> nn.Module:
        return self._module.student

    @property
    def ema(self) -> nn.Module:
        return self._module.ema

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """Dry run: EMA and student outputs on one batch -> build adapters, check shapes."""
        setup_objective(self._module, self.teacher_outputs(batch), batch, info)

    def teacher_outputs(self, batch: Batch) -> Outputs | None:
        if not self.needs.teacher:
            return None
        return self._module.teacher_outputs(batch.x, need_logits=self.needs.teacher_logits)

    def after_step(self) -> None:
        """``ema <- d_t * ema + (1 - d_t) * student`` after every optimizer step (identical on every rank)."""
        module = self._module
        module.updates += 1
        if self.warmup:  # min(decay, 1 - 1/(t+1)) as a tensor: no host sync per step
            d = (1.0 - 1.0 / (module.updates.double() + 1.0)).clamp(max=self.decay).float()
        else:
            d = self.decay
        ema_update(module.ema, module.student, d)

    def eval_models(self) -> dict[str, nn.Module]:
        if self.export == "ema":
            return {"ema": self._module.ema, "online": self._module.student}
        return {"student": self._module.student, "ema": self._module.ema}

    def describe(self) -> dict[str, Any]:
        return {"adapter_params": count_params(self._module.objective), "losses": list(self._module.objective.terms)}
