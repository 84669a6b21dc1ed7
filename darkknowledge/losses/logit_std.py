"""KD with logit standardization (Z-score) before the temperature softmax.

Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024
(arXiv:2403.01427), Sec. 4 / Algorithm 1. Each sample's logits are Z-scored before the
softmax, for the teacher and the student separately::

    Z(z) = (z - mean(z)) / (std(z) + eps)                     per row, z: (K,)
    L    = tau^2 * KL( softmax(Z(z_t) / tau) || softmax(Z(z_s) / tau) )   (batch mean)

i.e. each model gets its own adaptive temperature ``tau * std(z)``, and the student only
has to match the teacher's logit *relations*, not their range or offset. The loss is
invariant to ``z -> a * z + b`` (``a > 0``, per sample) of either model's logits.

As in the authors' code (sunshangquan/logit-standardization-KD,
``mdistiller/distillers/KD.py``): ``std`` is the unbiased (``K - 1``) standard deviation
(the paper writes the population one; the two differ by the constant factor
``sqrt(K / (K - 1))``, equivalent to a slightly different ``tau``), ``eps = 1e-7`` is added
to it, and the KL is scaled by ``tau^2``.

Shapes: student and teacher logits ``(B, K)``; labels are not used (use beside ``ce``).

Defaults: base temperature ``tau = 2`` with KD weight 9 are the authors' CIFAR-100
settings (README: ``--logit-stand --base-temp 2 --kd-weight 9``; some pairs use 3); their
``cfg.py`` keeps the CE weight at 1 (the weight is the objective's ``weight`` here).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from darkknowledge.data.batch import Batch
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import DistillLoss, Needs, Outputs, SetupInfo, check_logits_match, logits_pair
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.search_space import Range


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each row: ``(z - mean) / (std + eps)`` with the unbiased std (authors' code).

    Args:
        logits: ``(B, K)``, ``K >= 2``.
        eps: Added to the standard deviation (a constant row maps to zeros).

    Returns:
        ``(B, K)`` rows with mean 0 and (unbiased) std ~1.
    """
    mean = logits.mean(dim=-1, keepdim=True)  # (B, 1)
    std = logits.std(dim=-1, keepdim=True)  # (B, 1), unbiased
    return (logits - mean) / (std + eps)  # (B, K)


def logit_std_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """``T^2 * KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T))`` averaged over the batch.

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``; treated as a constant.
        T: Base temperature > 0 (applied after the Z-score).

    Returns:
        Scalar, >= 0; 0 when the logits are equal up to a per-row positive affine map.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp16/bf16 -> fp32
    z_s = standardize_logits(student_logits.to(dtype))  # (B, K)
    z_t = standardize_logits(teacher_logits.to(dtype))  # (B, K)
    return kd_soft_loss(z_s, z_t, T)


@register_loss("logit_std")
class LogitStandardizationKD(DistillLoss):
    """KD on Z-scored logits: ``T^2 * KL(p_t || p_s)`` with ``p = softmax(Z(z) / T)``.

    Shapes: student and teacher logits ``(B, K)`` (``K >= 2``). Labels unused; pair it with a
    ``ce`` term (authors' CIFAR-100: this term weight 9, base temperature 2).

    Args:
        T: Base temperature after standardization (authors' CIFAR-100 default: 2).
    """

    knowledge = "response"
    citation = "Sun, Ren, Li, Wang, Cao. Logit Standardization in Knowledge Distillation. CVPR 2024."
    needs_spec = Needs(teacher=True, teacher_logits=True)
    T: float
    search_space = {
        "T": Range(low=1.0, high=4.0, log=True),  # authors: base temperature 2 (some pairs 3)
        "weight": Range(low=1.0, high=16.0, log=True),  # authors: KD weight 9
    }

    def __init__(self, T: Annotated[float, Field(gt=0.0)] = 2.0) -> None:
        super().__init__()
        self.T = T

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        check_logits_match(student, teacher, "logit_std")

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        return logit_std_loss(*logits_pair(student, teacher, "logit_std"), self.T)
