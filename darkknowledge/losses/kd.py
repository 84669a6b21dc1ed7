"""Response-based knowledge distillation with softened logits.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NeurIPS Deep
Learning Workshop 2015 (arXiv:1503.02531), Sec. 2:

    L = alpha * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) ) + (1 - alpha) * CE(z_s, y)

The ``T^2`` factor keeps the soft term's gradient magnitude independent of ``T`` (the
gradient of the KL term scales as ``1/T^2``). As ``T -> inf`` with zero-mean logits,
``T^2 KL -> (1 / 2K) * ||z_s - z_t||^2`` per sample (logit matching, Sec. 2.1).
Defaults ``T=4``, ``alpha=0.9`` follow the CRD/RepDistiller CIFAR-100 setting.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from darkknowledge.data.batch import Batch
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import DistillLoss, Needs, Outputs, SetupInfo, check_logits_match
from darkknowledge.losses.ce import cross_entropy


def kd_soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` with temperature ``T``, averaged over the batch.

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``; treated as a constant.
        T: Temperature > 0.

    Returns:
        Scalar, >= 0; exactly 0 when the logits are equal.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
    log_p_s = F.log_softmax(student_logits.to(dtype) / T, dim=-1)  # (B, K)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / T, dim=-1)  # (B, K)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)  # sum_k p_t (log p_t - log p_s)
    return kl * (T * T)


@register_loss("kd")
class KD(DistillLoss):
    """Hinton et al. 2015 KD: ``alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE``.

    Shapes: student and teacher logits ``(B, K)``, labels ``(B,)`` (``-1`` = unlabelled,
    which then gets only the soft term). With ``alpha=1`` the term is the soft part alone
    (use it beside a separate ``ce`` term).

    Args:
        T: Softmax temperature (paper: 1-20; RepDistiller CIFAR-100: 4).
        alpha: Weight of the soft term against cross-entropy (RepDistiller: 0.9).
    """

    knowledge = "response"
    citation = "Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv:1503.02531, 2015."
    needs_spec = Needs(teacher=True, teacher_logits=True, labels=True)

    def __init__(
        self,
        T: Annotated[float, Field(gt=0.0)] = 4.0,
        alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9,
    ) -> None:
        super().__init__()
        self.T = T
        self.alpha = alpha

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        check_logits_match(student, teacher, "kd")

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        soft = kd_soft_loss(student.logits, teacher.logits, self.T)
        if self.alpha >= 1.0:
            return self.alpha * soft
        return self.alpha * soft + (1.0 - self.alpha) * cross_entropy(student.logits, batch.y, all_labeled=batch.labeled)
