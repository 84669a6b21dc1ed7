"""Neuron selectivity transfer (NST): MMD between the distributions of neuron activation maps.

Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
arXiv:1707.01219, 2017.

A feature map ``F`` of shape ``(B, C, *S)`` is seen, per sample, as a set of ``C`` samples
(one per channel / neuron): the channel's spatial map ``f^i`` flattened to ``M = prod(S)``
values and L2-normalized. With a kernel ``k`` the squared maximum mean discrepancy between
the student's set ``{f_s^i}`` (``C_s`` items) and the teacher's ``{f_t^j}`` (``C_t`` items) is
(paper Eq. 5/6)::

    MMD^2 = 1/C_t^2 sum_{j,j'} k(f_t^j, f_t^j') + 1/C_s^2 sum_{i,i'} k(f_s^i, f_s^i')
            - 2/(C_s C_t) sum_{i,j} k(f_s^i, f_t^j)

with the polynomial kernel ``k(x, y) = (x^T y + c)^d``, ``d = 2``, ``c = 0`` (the paper's best
kernel, also HobbitLong/RepDistiller ``distiller_zoo/NST.py``). The loss averages ``MMD^2``
over the batch and sums it over the tapped pairs. The paper writes the term as
``lambda / 2 * MMD^2``; RepDistiller uses weight 50 on CIFAR-100: set it as the term's weight.

Shapes: feature maps ``(B, C, L)`` or ``(B, C, H, W)``. Channel counts may differ (MMD compares
sets); the spatial sizes must match, so the student map is resized to the teacher's (adaptive
average pooling when larger, as RepDistiller; interpolation when smaller; see
:func:`darkknowledge.losses.at.resize_to`). A ``(B, D)`` vector has no neuron maps: ``ShapeError``.
Default taps: all stage outputs paired by depth (as RepDistiller).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses import register_loss
from darkknowledge.losses.at import check_feature_map, resize_to
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.feature import FeatureLoss
from darkknowledge.search_space import Range


def poly_kernel(a: torch.Tensor, b: torch.Tensor, degree: int = 2, c: float = 0.0) -> torch.Tensor:
    """Batched Gram matrix ``(a_i^T b_j + c)^d``: ``(B, N, M)``, ``(B, K, M)`` -> ``(B, N, K)``."""
    return (torch.bmm(a, b.transpose(1, 2)) + c).pow(degree)  # (B, N, K)


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor, degree: int = 2, c: float = 0.0) -> torch.Tensor:
    """Batch mean of ``MMD^2`` between the normalized channel maps of ``f_s`` and ``f_t``.

    Args:
        f_s: Student feature map ``(B, C_s, *S_s)``.
        f_t: Teacher feature map ``(B, C_t, *S_t)`` (constant).
        degree: Polynomial kernel degree ``d``.
        c: Polynomial kernel offset.

    Returns:
        Scalar; 0 when the two sets of normalized channel maps are equal.
    """
    check_feature_map(f_s, "student feature")
    check_feature_map(f_t, "teacher feature")
    dtype = torch.promote_types(f_s.dtype, torch.float32)  # fp16/bf16 -> fp32
    f_s = resize_to(f_s.to(dtype), tuple(f_t.shape[2:]))  # (B, C_s, *S_t)
    s = F.normalize(f_s.flatten(2), dim=2)  # (B, C_s, M)
    t = F.normalize(f_t.to(dtype).flatten(2), dim=2)  # (B, C_t, M)
    k_tt = poly_kernel(t, t, degree, c).mean(dim=(1, 2))  # (B,)  constant
    k_ss = poly_kernel(s, s, degree, c).mean(dim=(1, 2))  # (B,)
    k_st = poly_kernel(s, t, degree, c).mean(dim=(1, 2))  # (B,)
    return (k_tt + k_ss - 2.0 * k_st).mean()


@register_loss("nst")
class NST(FeatureLoss):
    """Neuron selectivity transfer: ``sum_j mean_b MMD^2_k(student maps, teacher maps)``.

    Shapes: every tapped pair is a feature map ``(B, C, L)`` or ``(B, C, H, W)``; channels may
    differ; the student map is resized to the teacher's spatial size. Set the paper's
    ``lambda / 2`` (RepDistiller: 50) as the term's ``weight``.

    Args:
        degree: Degree ``d`` of the polynomial kernel ``(x^T y + c)^d`` (paper: 2).
        c: Offset ``c`` of the polynomial kernel (paper: 0).
        student_taps: Student module paths (default: stage outputs).
        teacher_taps: Teacher module paths, one per student path.
    """

    knowledge = "feature"
    citation = (
        "Huang, Wang. Like What You Like: Knowledge Distill via Neuron Selectivity Transfer. arXiv:1707.01219, 2017."
    )
    default_taps = "stages"
    search_space = {
        "weight": Range(low=5.0, high=100.0, log=True),  # RepDistiller: 50
    }

    def __init__(
        self,
        degree: Annotated[int, Field(ge=1)] = 2,
        c: Annotated[float, Field(ge=0.0)] = 0.0,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.degree = degree
        self.c = c

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        for (sp, tp), f_s, f_t in zip(self.pairs, self.student_features(student), self.teacher_features(teacher)):
            check_feature_map(f_s, f"losses.nst: student tap {sp!r}")
            check_feature_map(f_t, f"losses.nst: teacher tap {tp!r}")
            if f_s.dim() != f_t.dim():
                raise ShapeError(
                    f"losses.nst: student tap {sp!r} {tuple(f_s.shape)} and teacher tap {tp!r} {tuple(f_t.shape)} "
                    "have different spatial ranks; pair 1-D maps with 1-D maps and 2-D with 2-D"
                )

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        losses = [
            nst_loss(s, t, self.degree, self.c)
            for s, t in zip(self.student_features(student), self.teacher_features(teacher))
        ]
        return torch.stack(losses).sum()
