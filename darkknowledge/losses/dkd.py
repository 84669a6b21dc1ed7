"""Decoupled Knowledge Distillation (DKD).

Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022
(arXiv:2203.08679), Sec. 3. With temperature ``T``, the softened class probabilities
``p = softmax(z / T)`` of one sample with target class ``t`` are split into

* the binary target / non-target probabilities ``b = [p_t, 1 - p_t]`` and
* the distribution among the non-target classes ``p_hat_i = p_i / (1 - p_t)`` (``i != t``),
  which equals ``softmax`` over the non-target logits alone.

Eq. (1) of the paper reformulates KD exactly as ``KD = TCKD + (1 - p_t^T) * NCKD`` with
``TCKD = KL(b^T || b^S)`` and ``NCKD = KL(p_hat^T || p_hat^S)``; DKD decouples the two with
free weights (Eq. 2)::

    L_DKD = alpha * T^2 * TCKD + beta * T^2 * NCKD        (averaged over the batch)

The ``T^2`` factor follows the authors' code (megvii-research/mdistiller
``distillers/DKD.py``); the total there is ``CE + min(epoch / warmup, 1) * L_DKD``.

Warm-up: a loss term does not see the epoch. DKD's linear warm-up is the objective's
``warmup_epochs`` key of the term (``dkd: {warmup_epochs: 20}``), which ramps the weight
linearly from 0 to 1 over the first ``warmup_epochs`` epochs (fractional epochs, so it is
continuous where mdistiller steps once per epoch: the two differ by < 1/warmup).

Shapes: student and teacher logits ``(B, K)`` with ``K >= 2``; labels ``(B,)``. A sample
without a label (``-1``, e.g. a transfer set) takes the teacher's arg-max class as its
target (our choice: DKD needs a target class and the paper only uses labelled data).

Defaults: ``alpha=1, beta=8, T=4`` are mdistiller's CIFAR-100 values (``CFG.DKD``; CE
weight 1, warm-up 20 epochs); ImageNet uses ``beta=0.5, T=1``.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import DistillLoss, Needs, Outputs, SetupInfo, check_logits_match, logits_pair
from darkknowledge.search_space import Range


def targets_or_teacher_argmax(labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Labels, with the teacher's arg-max class where a sample is unlabelled (``-1``).

    Args:
        labels: ``(B,)`` integer classes, ``-1`` for unlabelled samples.
        teacher_logits: ``(B, K)``.

    Returns:
        ``(B,)`` int64 classes in ``[0, K)``.
    """
    pseudo = teacher_logits.argmax(dim=-1)  # (B,)
    return torch.where(labels == UNLABELED, pseudo, labels).long()  # (B,)


def split_target(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split logits into the target logit and the ``K - 1`` non-target logits (order kept).

    Args:
        logits: ``(B, K)``.
        target: ``(B,)`` classes.

    Returns:
        ``(z_target (B, 1), z_other (B, K - 1))``.
    """
    b, k = logits.shape
    is_target = F.one_hot(target, k).bool()  # (B, K)
    z_target = logits.gather(1, target[:, None])  # (B, 1)
    z_other = logits[~is_target].view(b, k - 1)  # (B, K-1)
    return z_target, z_other


def dkd_parts(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, T: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``T^2 * TCKD`` and ``T^2 * NCKD`` (Zhao et al. 2022, Eq. 1).

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``; treated as a constant.
        target: ``(B,)`` target classes.
        T: Temperature > 0.

    Returns:
        ``(tckd (B,), nckd (B,))``, both >= 0 and 0 when the logits are equal.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp16/bf16 -> fp32
    z_s = student_logits.to(dtype) / T  # (B, K)
    z_t = teacher_logits.to(dtype) / T  # (B, K)
    log_p_s = F.log_softmax(z_s, dim=-1)  # (B, K)
    log_p_t = F.log_softmax(z_t, dim=-1)  # (B, K)
    lt_s, lo_s = split_target(log_p_s, target)  # (B, 1), (B, K-1)
    lt_t, lo_t = split_target(log_p_t, target)  # (B, 1), (B, K-1)
    # binary [p_t, 1 - p_t] in log space: log(1 - p_t) = logsumexp of the non-target log-probs
    log_b_s = torch.cat([lt_s, lo_s.logsumexp(-1, keepdim=True)], dim=-1)  # (B, 2)
    log_b_t = torch.cat([lt_t, lo_t.logsumexp(-1, keepdim=True)], dim=-1)  # (B, 2)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(-1)  # (B,)  KL(b^T || b^S)
    # non-target distribution = softmax over the non-target logits only
    _, zo_s = split_target(z_s, target)  # (B, K-1)
    _, zo_t = split_target(z_t, target)  # (B, K-1)
    log_q_s = F.log_softmax(zo_s, dim=-1)  # (B, K-1)
    log_q_t = F.log_softmax(zo_t, dim=-1)  # (B, K-1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(-1)  # (B,)  KL(p_hat^T || p_hat^S)
    return tckd * (T * T), nckd * (T * T)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    T: float,
) -> torch.Tensor:
    """``mean_b(alpha * T^2 * TCKD + beta * T^2 * NCKD)`` (Zhao et al. 2022, Eq. 2).

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``; treated as a constant.
        target: ``(B,)`` target classes in ``[0, K)``.
        alpha: Weight of the target-class term.
        beta: Weight of the non-target-class term.
        T: Temperature > 0.

    Returns:
        Scalar, >= 0.
    """
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, T)  # (B,), (B,)
    return (alpha * tckd + beta * nckd).mean()


@register_loss("dkd")
class DKD(DistillLoss):
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` with temperature ``T`` (T^2-scaled).

    Use it beside a ``ce`` term; put DKD's linear warm-up in the term's ``warmup_epochs``.
    Shapes: logits ``(B, K)``, labels ``(B,)`` (``-1`` -> the teacher's arg-max class).

    Args:
        alpha: Weight of target-class KD (TCKD); mdistiller CIFAR-100: 1.
        beta: Weight of non-target-class KD (NCKD); mdistiller CIFAR-100: 8 (ImageNet 0.5).
        T: Softmax temperature; mdistiller CIFAR-100: 4 (ImageNet 1).
    """

    knowledge = "response"
    citation = "Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation. CVPR 2022."
    needs_spec = Needs(teacher=True, teacher_logits=True, labels=True)
    T: float
    search_space = {
        "beta": Range(low=0.5, high=8.0, log=True),  # mdistiller: 8 (CIFAR-100), 0.5 (ImageNet)
        "T": Range(low=1.0, high=8.0, log=True),  # mdistiller: 4 (CIFAR-100), 1 (ImageNet)
    }

    def __init__(
        self,
        alpha: Annotated[float, Field(ge=0.0)] = 1.0,
        beta: Annotated[float, Field(ge=0.0)] = 8.0,
        T: Annotated[float, Field(gt=0.0)] = 4.0,
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.T = T

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        check_logits_match(student, teacher, "dkd")
        if student.logits is not None and student.logits.shape[-1] < 2:
            raise ShapeError(f"loss 'dkd': needs at least 2 classes, got logits {tuple(student.logits.shape)}")

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        s, t = logits_pair(student, teacher, "dkd")
        target = targets_or_teacher_argmax(batch.y, t)  # (B,)
        return dkd_loss(s, t, target, self.alpha, self.beta, self.T)
