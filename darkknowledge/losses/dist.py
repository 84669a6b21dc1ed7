"""DIST: distillation by correlation of predictions (inter- and intra-class relations).

Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher",
NeurIPS 2022 (arXiv:2205.10536), Sec. 3. With ``Y = softmax(Z / T)`` (the paper's ``tau``) row-wise for the
student (``Y^s``) and the teacher (``Y^t``), both ``(B, K)``, and the Pearson distance
``d_p(u, v) = 1 - rho_p(u, v)``:

    L_inter = 1/B * sum_i d_p(Y^s_{i,:}, Y^t_{i,:})     (Eq. 5: each sample's class ranking)
    L_intra = 1/K * sum_j d_p(Y^s_{:,j}, Y^t_{:,j})     (Eq. 6: each class across the batch)
    L_DIST  = T^2 * (beta * L_inter + gamma * L_intra)     (Eq. 7, without the CE term)

``rho_p(u, v) = <u - mean(u), v - mean(v)> / (||u - mean(u)|| * ||v - mean(v)|| + eps)``,
``eps = 1e-8`` as in the authors' code (hunto/image_classification_sota
``lib/models/losses/dist_kd.py``). The Pearson correlation is invariant to a positive
affine map of either argument, so DIST matches relations (rankings and relative gaps)
rather than exact probabilities as KL does.

Shapes: student and teacher logits ``(B, K)``. Needs no labels. The intra-class term
needs ``B >= 2`` (with one sample it is the constant 1: a column of one value has no
correlation).

Defaults ``beta = gamma = T = 1`` are the authors' classification code and the paper's
ImageNet setting (CE weight 1, DIST weight 1). For CIFAR-100 the paper reports
``T = 4``, ``beta = gamma = 2`` (as reproduced by mdistiller-based implementations;
not verified against the authors' repository here).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from darkknowledge.data.batch import Batch
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import DistillLoss, Needs, Outputs, SetupInfo, check_logits_match, logits_pair
from darkknowledge.search_space import Range


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of matching rows of ``a`` and ``b``.

    Args:
        a: ``(N, M)``.
        b: ``(N, M)``.
        eps: Added to the product of the norms (authors' code: 1e-8).

    Returns:
        ``(N,)`` correlations in ``[-1, 1]`` (0 for a constant row).
    """
    a_c = a - a.mean(dim=1, keepdim=True)  # (N, M)
    b_c = b - b.mean(dim=1, keepdim=True)  # (N, M)
    return (a_c * b_c).sum(1) / (a_c.norm(dim=1) * b_c.norm(dim=1) + eps)  # (N,)


def inter_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """``1 - mean_i rho(y_s[i, :], y_t[i, :])`` (Eq. 5).

    Args:
        y_s: ``(B, K)`` student probabilities.
        y_t: ``(B, K)`` teacher probabilities.

    Returns:
        Scalar in ``[0, 2]``.
    """
    return 1.0 - pearson_rows(y_s, y_t).mean()


def intra_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """``1 - mean_j rho(y_s[:, j], y_t[:, j])`` (Eq. 6): the inter relation of the transposes.

    Args:
        y_s: ``(B, K)`` student probabilities.
        y_t: ``(B, K)`` teacher probabilities.

    Returns:
        Scalar in ``[0, 2]``.
    """
    return inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))  # on (K, B)


def dist_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, gamma: float, T: float
) -> torch.Tensor:
    """``T^2 * (beta * L_inter + gamma * L_intra)`` on ``softmax(z / T)`` (Eq. 7).

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``; treated as a constant.
        beta: Weight of the inter-class (per sample) relation.
        gamma: Weight of the intra-class (per class) relation.
        T: Temperature > 0 (the paper's ``tau``).

    Returns:
        Scalar, >= 0; ~0 when the logits are equal.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp16/bf16 -> fp32
    y_s = torch.softmax(student_logits.to(dtype) / T, dim=1)  # (B, K)
    y_t = torch.softmax(teacher_logits.to(dtype) / T, dim=1)  # (B, K)
    inter = inter_class_relation(y_s, y_t)  # scalar
    intra = intra_class_relation(y_s, y_t)  # scalar
    return (T * T) * (beta * inter + gamma * intra)


@register_loss("dist")
class DIST(DistillLoss):
    """DIST: Pearson-correlation match of inter-class (rows) and intra-class (columns) relations.

    Shapes: student and teacher logits ``(B, K)``; labels are not used (use beside ``ce``).

    Args:
        beta: Inter-class weight (authors' code and ImageNet: 1; CIFAR-100: 2).
        gamma: Intra-class weight (authors' code and ImageNet: 1; CIFAR-100: 2).
        T: Softmax temperature, the paper's ``tau`` (authors' code and ImageNet: 1; CIFAR-100: 4).
    """

    knowledge = "response"
    citation = "Huang, You, Wang, Qian, Xu. Knowledge Distillation from A Stronger Teacher. NeurIPS 2022."
    needs_spec = Needs(teacher=True, teacher_logits=True)
    T: float
    renamed = {"tau": "T"}
    search_space = {
        "beta": Range(low=0.5, high=4.0, log=True),  # paper: 1 (ImageNet), 2 (CIFAR-100)
        "gamma": Range(low=0.5, high=4.0, log=True),  # paper: 1 (ImageNet), 2 (CIFAR-100)
        "T": Range(low=1.0, high=8.0, log=True),  # paper: 1 (ImageNet), 4 (CIFAR-100)
    }

    def __init__(
        self,
        beta: Annotated[float, Field(ge=0.0)] = 1.0,
        gamma: Annotated[float, Field(ge=0.0)] = 1.0,
        T: Annotated[float, Field(gt=0.0)] = 1.0,
    ) -> None:
        super().__init__()
        self.beta = beta
        self.gamma = gamma
        self.T = T

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        check_logits_match(student, teacher, "dist")

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        s, t = logits_pair(student, teacher, "dist")
        return dist_loss(s, t, self.beta, self.gamma, self.T)
