"""Teacher-free KD with a manually designed (virtual) teacher: Tf-KD_reg.

Yuan, Tay, Li, Wang & Feng, "Revisiting Knowledge Distillation via Label Smoothing
Regularization", CVPR 2020 (arXiv:1909.11723; "Revisit KD: a Teacher-free Framework"),
Sec. 5 (Tf-KD_reg). The virtual teacher puts probability ``a`` on the correct class and
spreads the rest uniformly::

    p^d(k) = a                 if k == y
             (1 - a) / (K - 1)  otherwise

and the student minimises ``(1 - alpha) * H(q, p) + alpha * D_KL(p^d_T, p_T)``.
This module implements what the official code (yuanli2333/Teacher-free-Knowledge-Distillation,
``loss_kd_regularization``) computes, which differs from the paper's equation as printed:

* the teacher is softened by treating ``p^d`` as *logits*: ``p^d_T = softmax(p^d / T)``
  (with ``T = 20``, ``a = 0.99`` and K = 10 this is close to uniform: 0.105 on the correct class);
* the student is *not* softened: ``p = softmax(z)``; there is no ``T^2`` factor;
* the KL is scaled by ``multiplier`` (official: ``nn.KLDivLoss()`` averages over B*K entries
  and CIFAR-100 uses ``multiplier = 100 = K``; here the KL is per sample, so our
  ``multiplier = official multiplier / K`` and 1.0 is the official CIFAR-100 setting).

So::

    L = (1 - alpha) * L_sup(z, y) + alpha * multiplier * KL( softmax(p^d / T) || softmax(z) )

with ``L_sup`` the recipe's ``losses`` objective (normally ``ce``; no teacher allowed).
Official CIFAR-100 ResNet18 setting: ``a = 0.99, T = 20, alpha = 0.1, multiplier = 1`` (ours).

Tf-KD_self (a pre-trained copy of the student teaches it) is ``born_again`` with
``generations: 1``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import DistillLoss, Needs, Outputs
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.losses.objective import Objective, TermSchedule
from darkknowledge.schemes import register_scheme
from darkknowledge.schemes.base import Scheme
from darkknowledge.schemes.cskd import teacher_free_objective
from darkknowledge.schemes.offline import Offline

if TYPE_CHECKING:
    from torch import nn

    from darkknowledge.schemes.context import SchemeContext

TERM = "tf_reg"


def virtual_teacher(labels: torch.Tensor, num_classes: int, a: float, T: float) -> torch.Tensor:
    """The softened virtual teacher ``softmax(p^d / T)`` of the official code.

    Args:
        labels: ``(B,)`` classes; ``-1`` rows (unlabelled) get the uniform distribution.
        num_classes: K >= 2.
        a: Probability of the correct class in ``p^d``, in ``(0, 1)``.
        T: Temperature > 0 applied to ``p^d`` as if it were logits.

    Returns:
        ``(B, K)`` distributions (rows sum to 1).
    """
    if num_classes < 2:
        raise ConfigError(f"tfkd needs at least 2 classes (got {num_classes})")
    labelled = labels != UNLABELED  # (B,)
    p_d = torch.full((labels.shape[0], num_classes), (1.0 - a) / (num_classes - 1), device=labels.device)  # (B, K)
    p_d.scatter_(1, labels.clamp(min=0)[:, None], a)
    p_d = torch.where(labelled[:, None], p_d, torch.zeros_like(p_d))  # unlabelled: uniform after softmax
    return F.softmax(p_d / T, dim=-1)  # (B, K)


def tf_reg_loss(logits: torch.Tensor, labels: torch.Tensor, a: float, T: float) -> torch.Tensor:
    """``KL( softmax(p^d / T) || softmax(z) )`` averaged over the labelled samples.

    Args:
        logits: ``(B, K)`` student logits (not softened, as in the official code).
        labels: ``(B,)``; ``-1`` rows are ignored.
        a: Correct-class probability of the virtual teacher.
        T: Temperature of the virtual teacher.

    Returns:
        Scalar >= 0.
    """
    keep = (labels != UNLABELED).to(logits.dtype)[:, None]  # (B, 1)
    target = virtual_teacher(labels, logits.shape[-1], a, T).log()  # (B, K): log q, so softmax(log q) = q
    # T=1 in kd_soft_loss: KL(softmax(log q) || softmax(z)); zeroed rows contribute exactly 0
    kl = kd_soft_loss(logits * keep, target * keep, 1.0)
    return kl * logits.shape[0] / keep.sum().clamp(min=1)


class VirtualTeacherLoss(DistillLoss):
    """The Tf-KD_reg term: ``multiplier * KL(virtual teacher || student)`` (labels only).

    Args:
        a: Correct-class probability of the virtual teacher.
        T: Its temperature.
        multiplier: Scale of the KL (see module docstring for the official equivalent).
    """

    knowledge = "label"
    citation = "Yuan et al., Revisiting Knowledge Distillation via Label Smoothing Regularization, CVPR 2020."
    needs_spec = Needs(labels=True)

    def __init__(self, a: float = 0.99, T: float = 20.0, multiplier: float = 1.0) -> None:
        super().__init__()
        self.a, self.T, self.multiplier = a, T, multiplier

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        return self.multiplier * tf_reg_loss(student.logits, batch.y, self.a, self.T)


@register_scheme("tfkd")
class TfKD(Offline):
    """Tf-KD_reg: a hand-made virtual teacher (``a`` on the true class) regularises the student.

    One stage of the offline machinery with no teacher: the objective is the recipe's
    supervised ``losses`` weighted ``1 - alpha`` plus the virtual-teacher term weighted ``alpha``.
    """

    citation = "Yuan et al., Revisiting Knowledge Distillation via Label Smoothing Regularization (Tf-KD), CVPR 2020."
    summary = "a manually designed virtual teacher (a on the true class, uniform rest) teaches the student"

    # one stage, no transfer set: Scheme's default run, so scheme.params are build's kwargs
    run = Scheme.__dict__["run"]

    @classmethod
    def build(  # type: ignore[override]
        cls,
        ctx: SchemeContext,
        seed: int,
        *,
        a: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.99,
        T: Annotated[float, Field(gt=0.0)] = 20.0,
        alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1,
        multiplier: Annotated[float, Field(ge=0.0)] = 1.0,
    ) -> TfKD:
        """The recipe's student (seed's init) with the Tf-KD_reg objective.

        Args:
            ctx: The run's context.
            seed: The run seed.
            a: Probability of the correct class in the virtual teacher (official: 0.99; paper 0.9-0.99).
            T: Temperature applied to the virtual teacher (official CIFAR-100: 20).
            alpha: Weight of the virtual-teacher term; the supervised losses get ``1 - alpha`` (official: 0.1).
            multiplier: Extra scale of the KL (ours 1.0 = official 100 on CIFAR-100).
        """
        return cls(ctx.student(seed), tfkd_objective(teacher_free_objective(ctx, "tfkd"), a, T, alpha, multiplier))

    def __init__(self, student: nn.Module, objective: Objective) -> None:
        super().__init__(student, objective, teacher=None)


def tfkd_objective(supervised: Objective, a: float, T: float, alpha: float, multiplier: float) -> Objective:
    """``(1 - alpha) * supervised + alpha * VirtualTeacherLoss(a, T, multiplier)``."""
    if TERM in supervised.terms:
        raise ConfigError(f"losses.{TERM}: the name is reserved by scheme 'tfkd'; rename that term")
    terms: dict[str, Any] = dict(supervised.terms.items())
    schedules = {name: replace(s, weight=s.weight * (1.0 - alpha)) for name, s in supervised.schedules.items()}
    terms[TERM] = VirtualTeacherLoss(a, T, multiplier)
    schedules[TERM] = TermSchedule(weight=alpha)
    return Objective(terms, schedules)
