"""Mean absolute error between student and teacher logits (DFAD's model discrepancy).

Fang, Song, Shen, Wang, Chen & Song, "Data-Free Adversarial Distillation", arXiv:1912.11006
(2019), Sec. 3: the discrepancy between teacher ``T`` and student ``S`` on an input is the mean
absolute error of their logits ``z_t``, ``z_s`` ``(K,)``, averaged over the batch::

    L = (1/B) sum_b (1/K) sum_k | z_s[b, k] - z_t[b, k] |

The student minimises it (imitation stage), the generator maximises it. The authors' code
(VainF/Data-Free-Adversarial-Distillation) computes it as ``F.l1_loss(s_logit, t_logit)``, the
mean over all ``B * K`` entries, which is the same number.

The teacher's logits are not detached: a data-free generator maximises this loss through the
teacher as well as the student (:mod:`darkknowledge.synthesis.dfad`); a frozen teacher's logits
carry no gradient anyway.

Shapes: student and teacher logits ``(B, K)``; labels unused.
"""

from __future__ import annotations

from typing import ClassVar

import torch

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
from darkknowledge.search_space import Range


def logit_l1_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_b (1/K) sum_k |z_s - z_t|`` (DFAD's MAE), in float32 for half-precision logits.

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``; gradients flow into it when it has any.

    Returns:
        Scalar >= 0; 0 when the logits are equal (and for an empty batch).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp16/bf16 -> fp32
    diff = student_logits.to(dtype) - teacher_logits.to(dtype)  # (B, K)
    if diff.numel() == 0:
        return diff.sum()  # 0, still attached to the graph
    return diff.abs().mean()  # mean over B and K = batch mean of the per-sample (1/K) L1


@register_loss("logit_l1")
class LogitL1(DistillLoss):
    """DFAD's logit MAE: ``mean_{b,k} |z_s - z_t|`` between student and teacher logits.

    Shapes: student and teacher logits ``(B, K)``. Labels unused (pair it with ``ce`` when some
    are available). No parameters: scale it with the term's ``weight``.
    """

    knowledge = "response"
    citation = "Fang, Song, Shen, Wang, Chen, Song. Data-Free Adversarial Distillation. arXiv:1912.11006, 2019."
    needs_spec = Needs(teacher=True, teacher_logits=True)
    search_space: ClassVar[dict[str, Range]] = {
        "weight": Range(low=0.1, high=10.0, log=True),  # DFAD: the student's only loss (weight 1)
    }

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        check_logits_match(student, teacher, "logit_l1")

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        return logit_l1_loss(*logits_pair(student, teacher, "logit_l1"))
