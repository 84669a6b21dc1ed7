"""Generalized distillation: imitate the teacher's softened outputs with the student's plain softmax.

Lopez-Paz, Bottou, Schölkopf & Vapnik, "Unifying distillation and privileged information",
ICLR 2016, Sec. 4, Eqs. (4)-(5). A teacher ``f_t`` learned on the privileged view ``x*`` gives
soft labels ``s_i = softmax(f_t(x*_i) / T)``; the student ``f_s`` on the regular view ``x`` solves

    f_s = argmin_f (1/n) sum_i [ (1 - lambda) l(y_i, softmax(f(x_i))) + lambda l(s_i, softmax(f(x_i))) ]

with ``l`` the cross-entropy. Unlike Hinton et al.'s KD, only the teacher is softened: the
student's softmax is at temperature 1. This term is the imitation part ``l(s, softmax(z_s))``
(the ``(1 - lambda)`` part is a separate ``ce`` term, ``lambda`` the terms' weights)::

    L = scale * (1/B) sum_b sum_k -s[b, k] log softmax(z_s[b])[k],   s = softmax(z_t / T)

``scale`` is 1 in Eq. (4); the authors' code (lopezpaz/distillation_privileged_information,
``code/mnist.py``) multiplies the imitation term by ``T^2`` (``t2: true``), which is what their
MNIST numbers were measured with.

Shapes: student and teacher logits ``(B, K)``; labels unused (they belong to the ``ce`` term).
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field

from darkknowledge.data.batch import Batch
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import (
    DistillLoss,
    Needs,
    Outputs,
    SetupInfo,
    check_logits_match,
    logits_pair,
)
from darkknowledge.losses.kd import soft_log_probs
from darkknowledge.search_space import Range


def generalized_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float, t2: bool = False
) -> torch.Tensor:
    """``scale * mean_b CE(softmax(z_t / T), softmax(z_s))``, ``scale = T^2`` when ``t2`` else 1.

    Args:
        student_logits: ``(B, K)``; the student's softmax is not tempered.
        teacher_logits: ``(B, K)``; treated as a constant.
        T: Teacher temperature > 0.
        t2: Multiply by ``T^2`` (the authors' code) instead of 1 (the paper's Eq. 4).

    Returns:
        Scalar >= 0 (the soft labels' entropy at best, not 0); 0 for an empty batch.
    """
    soft = soft_log_probs(teacher_logits.detach(), T).exp()  # (B, K): s = softmax(z_t / T)
    log_p_s = soft_log_probs(student_logits, 1.0)  # (B, K): log softmax(z_s)
    ce = -(soft * log_p_s).sum() / max(1, student_logits.shape[0])  # batch mean of sum_k -s log p_s
    return ce * (T * T if t2 else 1.0)


@register_loss("gd")
class GeneralizedDistillation(DistillLoss):
    """Lopez-Paz et al. 2016 generalized distillation: ``CE(softmax(z_t / T), softmax(z_s))``.

    Shapes: student and teacher logits ``(B, K)``. Pair it with ``ce`` (weights ``1 - lambda``
    and ``lambda``): the teacher may read another view of each sample (privileged information,
    cross-modal distillation) than the student.

    Args:
        T: Temperature of the teacher's soft labels (paper grid 1-50; best MNIST results at 10-20).
        t2: Scale by ``T^2`` as the authors' code does (the paper's equation has no factor).
    """

    knowledge = "response"
    citation = "Lopez-Paz, Bottou, Schölkopf, Vapnik. Unifying distillation and privileged information. ICLR 2016."
    needs_spec = Needs(teacher=True, teacher_logits=True)
    T: float
    search_space: ClassVar[dict[str, Range]] = {
        "T": Range(low=1.0, high=50.0, log=True),  # the paper's grid: 1, 2, 5, 10, 20, 50
    }

    def __init__(self, T: Annotated[float, Field(gt=0.0)] = 10.0, t2: bool = False) -> None:
        super().__init__()
        self.T = T
        self.t2 = t2

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        check_logits_match(student, teacher, "gd")

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        return generalized_distillation_loss(*logits_pair(student, teacher, "gd"), self.T, self.t2)
