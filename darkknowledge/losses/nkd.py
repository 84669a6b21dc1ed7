"""Normalized Knowledge Distillation (NKD).

Yang, Zeng, Zhang, Li & Yu, "From Knowledge Distillation to Self-Knowledge Distillation:
A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023
(arXiv:2303.13005), Sec. 3.2, Eq. (8). With target class ``t``, ``T_i = softmax(z_t)_i``,
``S_i = softmax(z_s)_i`` (temperature 1) and ``N(.)`` the softmax over the non-target
logits only, at temperature ``lambda`` (the parameter ``T``, the one name every loss gives
its temperature; ``T_t`` below is the paper's teacher target probability, not a temperature)::

    L_NKD = - T_t * log S_t  -  gamma * lambda^2 * sum_{i != t} N(T^lambda)_i * log N(S^lambda)_i

averaged over the batch; the total is ``L_CE + L_NKD`` (CE weight 1 in the authors' code).
The first term is a soft target-class CE with the teacher's target probability as the
weight; the second is the cross-entropy of the *normalized* non-target distributions,
which NKD separates so that its scale no longer shrinks with ``1 - T_t`` as inside KD.

Minimum: the non-target term is a cross-entropy, minimized over the student's non-target
logits where ``N(S) = N(T)`` (identical logits) at ``gamma * lambda^2 * H(N(T^lambda))``; the
target term is then ``-T_t log T_t``. So identical logits give
``mean_b[-T_t log T_t + gamma lambda^2 H(N(T^lambda))]`` (not 0: a cross-entropy form).

As in the authors' code (yzd-v/cls_KD ``mmcls/models/dis_losses/nkd.py``): the teacher's
``T_t`` is a constant, non-target logits are gathered (the target column removed).
Shapes: logits ``(B, K)`` with ``K >= 2``; labels ``(B,)``. An unlabelled sample (``-1``)
takes the teacher's arg-max class as its target (our choice; NKD's self-KD variant and the
paper assume labels).

Defaults ``T = 1``, ``gamma = 1.5``: the authors' code and ImageNet setting; their
CIFAR-100 config uses ``T = 3``, ``gamma = 3.5``.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import DistillLoss, Needs, Outputs, SetupInfo, check_logits_match, logits_pair
from darkknowledge.losses.dkd import split_target, targets_or_teacher_argmax
from darkknowledge.search_space import Range


def nkd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, T: float, gamma: float
) -> torch.Tensor:
    """``mean_b[-T_t log S_t - gamma T^2 sum_{i!=t} N(T)_i log N(S)_i]`` (Eq. 8).

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``; treated as a constant.
        target: ``(B,)`` target classes in ``[0, K)``.
        T: Temperature of the non-target part (the paper's ``lambda``) > 0.
        gamma: Weight of the non-target part.

    Returns:
        Scalar, >= 0.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp16/bf16 -> fp32
    z_s = student_logits.to(dtype)  # (B, K)
    z_t = teacher_logits.to(dtype).detach()  # (B, K)
    log_s = F.log_softmax(z_s, dim=-1)  # (B, K)
    p_t = torch.softmax(z_t, dim=-1)  # (B, K)
    log_s_t, _ = split_target(log_s, target)  # (B, 1)
    t_t, _ = split_target(p_t, target)  # (B, 1)
    loss_target = -(t_t * log_s_t).mean()  # scalar
    _, zo_s = split_target(z_s, target)  # (B, K-1)
    _, zo_t = split_target(z_t, target)  # (B, K-1)
    log_n_s = F.log_softmax(zo_s / T, dim=-1)  # (B, K-1)
    n_t = torch.softmax(zo_t / T, dim=-1)  # (B, K-1)
    loss_non = -gamma * T * T * (n_t * log_n_s).sum(-1).mean()  # scalar
    return loss_target + loss_non


@register_loss("nkd")
class NKD(DistillLoss):
    """Normalized KD: soft target CE ``-T_t log S_t`` + normalized non-target CE at ``T``.

    Use it beside a ``ce`` term (weight 1 in the authors' code). Shapes: logits ``(B, K)``,
    labels ``(B,)`` (``-1`` -> the teacher's arg-max class).

    Args:
        T: Non-target temperature, the paper's ``lambda`` (authors' code / ImageNet: 1; CIFAR-100: 3).
        gamma: Non-target weight (authors' code / ImageNet: 1.5; CIFAR-100: 3.5).
    """

    knowledge = "response"
    citation = (
        "Yang, Zeng, Zhang, Li, Yu. From Knowledge Distillation to Self-Knowledge Distillation: "
        "A Unified Approach with Normalized Loss and Customized Soft Labels. ICCV 2023."
    )
    needs_spec = Needs(teacher=True, teacher_logits=True, labels=True)
    T: float
    renamed = {"temp": "T"}
    search_space = {
        "T": Range(low=1.0, high=4.0, log=True),  # authors: 1 (ImageNet), 3 (CIFAR-100)
        "gamma": Range(low=0.5, high=4.0, log=True),  # authors: 1.5 (ImageNet), 3.5 (CIFAR-100)
    }

    def __init__(
        self,
        T: Annotated[float, Field(gt=0.0)] = 1.0,
        gamma: Annotated[float, Field(ge=0.0)] = 1.5,
    ) -> None:
        super().__init__()
        self.T = T
        self.gamma = gamma

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        check_logits_match(student, teacher, "nkd")
        if student.logits is not None and student.logits.shape[-1] < 2:
            raise ShapeError(f"loss 'nkd': needs at least 2 classes, got logits {tuple(student.logits.shape)}")

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        s, t = logits_pair(student, teacher, "nkd")
        target = targets_or_teacher_argmax(batch.y, t)  # (B,)
        return nkd_loss(s, t, target, self.T, self.gamma)
