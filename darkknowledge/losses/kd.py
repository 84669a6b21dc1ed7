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
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.losses import fused, register_loss
from darkknowledge.losses.base import DistillLoss, Needs, Outputs, SetupInfo, check_logits_match, logits_pair
from darkknowledge.losses.ce import cross_entropy
from darkknowledge.search_space import Range


def soft_log_probs(logits: torch.Tensor, T: float) -> torch.Tensor:
    """``log softmax(z / T)`` over the last dim, in float32 for fp16/bf16 logits.

    Args:
        logits: ``(B, K)``.
        T: Temperature > 0.

    Returns:
        ``(B, K)`` log-probabilities (float32, or float64 for float64 logits).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits / T, dim=-1)


def kd_soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """``T^2 * KL(p_t^T || p_s^T)``, averaged over the batch.

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``; treated as a constant.
        T: Temperature > 0.

    Returns:
        Scalar, >= 0; exactly 0 when the logits are equal (and for an empty batch).
    """
    log_p_s = soft_log_probs(student_logits, T)  # (B, K)
    log_p_t = soft_log_probs(teacher_logits, T)  # (B, K)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)  # sum_b sum_k p_t (log p_t - log p_s)
    return T * T * kl / max(1, student_logits.shape[0])


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, T: float, alpha: float
) -> torch.Tensor:
    """``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(z_s, y)``, batch means (Hinton 2015).

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``; treated as a constant.
        labels: ``(B,)``; ``-1`` marks an unlabelled sample (soft term only).
        T: Temperature > 0.
        alpha: Weight of the soft term, in ``[0, 1]``.

    Returns:
        Scalar.
    """
    soft = kd_soft_loss(student_logits, teacher_logits, T)
    if alpha >= 1.0:
        return alpha * soft
    return alpha * soft + (1.0 - alpha) * cross_entropy(student_logits, labels)


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
    T: float
    search_space = {
        "T": Range(low=1.0, high=8.0, log=True),  # Hinton et al. 1-20; RepDistiller CIFAR-100: 4
        "alpha": Range(low=0.1, high=1.0),  # RepDistiller: 0.9
    }

    def __init__(
        self,
        T: Annotated[float, Field(gt=0.0)] = 4.0,
        alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9,
    ) -> None:
        super().__init__()
        self.T = T
        self.alpha = alpha

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> Needs:
        """Labels are read only by the cross-entropy part (``alpha < 1``)."""
        return Needs(teacher=True, teacher_logits=True, labels=self.alpha < 1.0)

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        check_logits_match(student, teacher, "kd")

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        s, t = logits_pair(student, teacher, "kd")
        if fused.ENABLED:  # the same value and gradient in fewer ops (losses/fused.py)
            return fused.kd_loss(s, t, batch.y, self.T, self.alpha, batch.labeled)
        return kd_loss(s, t, batch.y, self.T, self.alpha)
