"""Similarity-Preserving KD: match the batch's row-normalised similarity matrices.

Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, Sec. 3, Eq. 1-4. For
a layer pair, with ``Q`` the activation map of a batch of ``b`` samples reshaped to ``(b, c*h*w)``:

    G~ = Q Q^T                       (b, b)
    G[i, :] = G~[i, :] / ||G~[i, :]||_2
    L_SP = 1/b^2 * sum_{(l, l')} || G_T^(l) - G_S^(l') ||_F^2

The ``b x b`` matrices do not depend on the channel count or spatial size, so teacher and
student maps may differ in both (no adapter), and permuting the channels of either side
leaves ``G`` unchanged. Any feature ``(B, D)``, ``(B, C, L)`` or ``(B, C, H, W)`` is flattened.

Defaults: the deepest stage output of each network (RepDistiller ``train_student.py`` uses
``feat[-2]``, the last block's map before pooling; the paper uses the last block of each
group for CIFAR-10 WRNs). The paper's weight ``gamma = 3000`` (CIFAR-10; RepDistiller's
CIFAR-100 ``-b 3000``) goes in the recipe as the term's ``weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from darkknowledge.data.batch import Batch
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import Outputs
from darkknowledge.losses.feature import FeatureLoss
from darkknowledge.search_space import Range


def similarity_matrix(feature: torch.Tensor) -> torch.Tensor:
    """``G``: the row-L2-normalised Gram matrix of the flattened batch.

    Args:
        feature: ``(B, *S)``, flattened to ``(B, D)``.

    Returns:
        ``(B, B)``, every row of unit norm (a zero row stays zero).
    """
    dtype = torch.promote_types(feature.dtype, torch.float32)  # Gram sums overflow fp16
    q = feature.reshape(len(feature), -1).to(dtype)  # (B, D)
    gram = q @ q.t()  # (B, B)
    return F.normalize(gram, p=2, dim=1)  # (B, B)


def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1/b^2 * ||G_T - G_S||_F^2`` for one layer pair.

    Args:
        student: ``(B, *S)``.
        teacher: ``(B, *T)``; a constant.

    Returns:
        Scalar; 0 when the two similarity matrices agree.
    """
    b = len(student)
    g_s = similarity_matrix(student)  # (B, B)
    g_t = similarity_matrix(teacher.detach())  # (B, B)
    return (g_t - g_s).pow(2).sum() / max(b * b, 1)


@register_loss("sp")
class SP(FeatureLoss):
    """Similarity-preserving KD (Tung & Mori 2019): ``1/b^2 ||G_T - G_S||_F^2`` summed over tap pairs.

    Shapes: each tap ``(B, ...)``, flattened; teacher and student may differ in channels
    and spatial size.

    Args:
        student_taps: Student module paths (default: the deepest stage output).
        teacher_taps: Teacher module paths (default: the deepest stage output).
    """

    knowledge = "relation"
    citation = "Tung, Mori. Similarity-Preserving Knowledge Distillation. ICCV 2019."
    default_taps = "last_stage"
    search_space = {
        "weight": Range(low=300.0, high=10000.0, log=True),  # paper/RepDistiller: 3000
    }

    def __init__(self, student_taps: list[str] | None = None, teacher_taps: list[str] | None = None) -> None:
        super().__init__(student_taps, teacher_taps)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        pairs = zip(self.student_features(student), self.teacher_features(teacher))
        return sum(sp_loss(s, t) for s, t in pairs)  # type: ignore[return-value]  # a tensor: at least one pair
