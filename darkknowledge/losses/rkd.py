"""Relational Knowledge Distillation: match the distances and angles within a batch.

Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019, Sec. 3.2. With the
embeddings ``t_i`` (teacher) and ``s_i`` (student) of the ``B`` samples of a batch:

* distance-wise (Eq. 4-5): ``psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu``, with ``mu`` the mean
  distance over the pairs ``i != j`` of the batch, and
  ``L_D = mean_{i,j} huber(psi_D(s_i, s_j) - psi_D(t_i, t_j))``;
* angle-wise (Eq. 6-7): ``psi_A(t_i, t_j, t_k) = <e_ij, e_kj>``, ``e_ij = (t_i - t_j) / ||t_i - t_j||``
  (the cosine of the angle at the vertex ``t_j``), and
  ``L_A = mean_{i,j,k} huber(psi_A(s_i, s_j, s_k) - psi_A(t_i, t_j, t_k))``;
* ``L = w_d * L_D + w_a * L_A``.

``huber`` is the Huber loss with ``delta = 1`` (``F.smooth_l1_loss``). As in the authors' code
(lenscloth/RKD) and RepDistiller ``distiller_zoo/RKD.py``, the means run over all ``B^2`` /
``B^3`` entries, the degenerate ones (``i == j`` etc., zero on both sides) included.

Both terms are invariant to translating, rotating or scaling either embedding, so student and
teacher features may have different widths and no adapter is needed. Features ``(B, D)``,
``(B, C, L)`` or ``(B, C, H, W)`` are flattened to ``(B, -1)`` (as RepDistiller does).

Defaults: ``w_d = 25``, ``w_a = 50`` (paper Sec. 4 and RepDistiller's ``RKDLoss``), taps on
the penultimate feature (RepDistiller: ``feat[-1]``, the pooled feature before the classifier).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from darkknowledge.data.batch import Batch
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import Outputs
from darkknowledge.losses.feature import FeatureLoss
from darkknowledge.search_space import Range


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``e`` with a zero diagonal.

    Args:
        e: ``(B, D)``.
        eps: Floor of the squared distance before the square root (finite gradients).

    Returns:
        ``(B, B)``.
    """
    sq = e.pow(2).sum(dim=1)  # (B,)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * e @ e.t()).clamp(min=eps)  # (B, B)
    eye = torch.eye(len(e), dtype=torch.bool, device=e.device)  # (B, B)
    return d2.sqrt().masked_fill(eye, 0.0)  # (B, B)


def normalized_distances(e: torch.Tensor) -> torch.Tensor:
    """``psi_D``: pairwise distances divided by their mean over the ``i != j`` pairs.

    Args:
        e: ``(B, D)``.

    Returns:
        ``(B, B)``; all zero for ``B < 2``.
    """
    d = pairwise_distances(e)  # (B, B)
    b = len(e)
    mu = d.sum() / max(b * (b - 1), 1)  # every off-diagonal entry is >= sqrt(eps) > 0, so this is mean(d[d > 0])
    return d / mu.clamp(min=1e-12)  # (B, B)


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """``psi_A``: ``angles[j, i, k] = <e_ij, e_kj>``, the cosine of the angle at vertex ``j``.

    Args:
        e: ``(B, D)``.

    Returns:
        ``(B, B, B)``; entries with ``i == j`` or ``k == j`` are 0.
    """
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # (B, B, D): diff[j, i] = e_i - e_j
    unit = F.normalize(diff, p=2, dim=2)  # (B, B, D), zero rows stay zero
    return torch.bmm(unit, unit.transpose(1, 2))  # (B, B, B)


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, w_d: float = 25.0, w_a: float = 50.0) -> torch.Tensor:
    """``w_d * L_D + w_a * L_A`` for one pair of features.

    Args:
        student: ``(B, *S)``, flattened to ``(B, D_s)``.
        teacher: ``(B, *T)``, flattened to ``(B, D_t)``; a constant.
        w_d: Weight of the distance term.
        w_a: Weight of the angle term.

    Returns:
        Scalar; 0 when the two embeddings are similar (equal up to translation, rotation, scale).
    """
    dtype = torch.promote_types(student.dtype, torch.float32)
    s = student.reshape(len(student), -1).to(dtype)  # (B, D_s)
    t = teacher.reshape(len(teacher), -1).to(dtype).detach()  # (B, D_t)
    loss = student.new_zeros((), dtype=dtype)
    if w_d > 0:
        loss = loss + w_d * F.smooth_l1_loss(normalized_distances(s), normalized_distances(t))  # mean of (B, B)
    if w_a > 0:
        loss = loss + w_a * F.smooth_l1_loss(triplet_angles(s), triplet_angles(t))  # mean of (B, B, B)
    return loss


@register_loss("rkd")
class RKD(FeatureLoss):
    """Relational KD (Park et al. 2019): distance- and angle-wise Huber losses over the batch.

    Shapes: each student/teacher tap gives ``(B, ...)``, flattened; widths may differ. With
    several tap pairs the losses are summed.

    Args:
        w_d: Weight of the distance-wise term (paper/RepDistiller: 25).
        w_a: Weight of the angle-wise term (paper/RepDistiller: 50).
        student_taps: Student module paths (default: the penultimate feature).
        teacher_taps: Teacher module paths (default: the penultimate feature).
    """

    knowledge = "relation"
    citation = "Park, Kim, Lu, Cho. Relational Knowledge Distillation. CVPR 2019."
    default_taps = "penultimate"
    search_space = {
        "w_d": Range(low=5.0, high=50.0, log=True),  # paper/RepDistiller: 25
        "w_a": Range(low=10.0, high=100.0, log=True),  # paper/RepDistiller: 50
    }

    def __init__(
        self,
        w_d: Annotated[float, Field(ge=0.0)] = 25.0,
        w_a: Annotated[float, Field(ge=0.0)] = 50.0,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.w_d = w_d
        self.w_a = w_a

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        pairs = zip(self.student_features(student), self.teacher_features(teacher))
        # a tensor: at least one pair:
        return sum(rkd_loss(s, t, self.w_d, self.w_a) for s, t in pairs)  # type: ignore[return-value]
