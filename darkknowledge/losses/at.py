"""Attention transfer (AT): match normalized spatial attention maps of student and teacher.

Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017 (arXiv:1612.03928).

For a feature map ``A`` of shape ``(B, C, *S)`` (``S`` = ``(L,)`` or ``(H, W)``), the
activation-based attention map is (paper Sec. 3.1, ``F_sum^p``; the authors' code uses the
channel mean, which differs by the constant ``1/C`` and is removed by the normalization)::

    Q(A) = vec( mean_c |A_c|^p ) / || vec( mean_c |A_c|^p ) ||_2        (B, prod(S))

and the transfer loss for the tapped pairs ``j`` (paper Eq. 2)::

    L_paper = beta / 2 * sum_j || Q_s^j - Q_t^j ||_p

What is implemented is the form of the authors' code (szagoruyko/attention-transfer
``at_loss``; HobbitLong/RepDistiller ``distiller_zoo/AT.py``), which squares the difference
and averages it over batch and positions::

    L = sum_j mean_{b, x} ( Q_s^j[b, x] - Q_t^j[b, x] )^2

``beta`` is the objective weight of the term: RepDistiller CIFAR-100 uses weight 1000 (the
paper's ``beta = 10^3``; the authors' later code multiplies by ``beta / 2``).

Defaults: ``p = 2`` (paper), all stage outputs paired by depth (the paper transfers at the end
of every residual group). Different spatial sizes: the *student* feature map is resized to the
teacher's before ``Q`` is taken (adaptive average pooling when it is larger, as RepDistiller
does; linear/bilinear interpolation when it is smaller, where RepDistiller would instead pool
the teacher down). Channel counts may differ freely (``Q`` has no channel dim). Attention needs
spatial positions: a ``(B, D)`` vector tap is a ``ShapeError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.feature import FeatureLoss
from darkknowledge.search_space import Range


def check_feature_map(x: torch.Tensor, where: str) -> None:
    """Raise ``ShapeError`` unless ``x`` is a ``(B, C, L)`` or ``(B, C, H, W)`` feature map."""
    if x.dim() not in (3, 4):
        raise ShapeError(
            f"{where} has shape {tuple(x.shape)}; this loss needs a feature map (B, C, L) or (B, C, H, W), "
            "not a vector: tap a convolutional layer (e.g. a stage output) instead of 'fc:input'"
        )


def resize_to(f_s: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resize the spatial dims of a student map ``(B, C, *S_s)`` to ``size`` (= ``S_t``).

    Adaptive average pooling when every dim shrinks or stays (RepDistiller's choice), else
    linear (1-D) / bilinear (2-D) interpolation.
    """
    size = tuple(int(s) for s in size)
    if tuple(f_s.shape[2:]) == size:
        return f_s
    if len(size) != f_s.dim() - 2:
        raise ShapeError(f"cannot resize a feature map of shape {tuple(f_s.shape)} to spatial size {size}")
    if all(s >= t for s, t in zip(f_s.shape[2:], size)):
        pool: Callable[..., torch.Tensor] = F.adaptive_avg_pool1d if len(size) == 1 else F.adaptive_avg_pool2d
        return pool(f_s, size)  # (B, C, *size)
    mode = "linear" if len(size) == 1 else "bilinear"
    return F.interpolate(f_s, size=size, mode=mode, align_corners=False)  # (B, C, *size)


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``Q = normalize(vec(mean_c |f|^p))``: ``(B, C, *S)`` -> ``(B, prod(S))``, unit L2 norm per row."""
    q = f.abs().pow(p).mean(dim=1)  # (B, *S)
    q = q.flatten(1)  # (B, prod(S))
    return F.normalize(q, p=2.0, dim=1)  # (B, prod(S)); an all-zero map stays 0


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT for one pair: ``mean_{b,x} (Q(f_s) - Q(f_t))^2`` after resizing the student map.

    Args:
        f_s: Student feature map ``(B, C_s, *S_s)``.
        f_t: Teacher feature map ``(B, C_t, *S_t)`` (constant).
        p: Power of the activations in the attention map.

    Returns:
        Scalar >= 0; 0 when the maps are equal (or equal up to a positive scale).
    """
    check_feature_map(f_s, "student feature")
    check_feature_map(f_t, "teacher feature")
    dtype = torch.promote_types(f_s.dtype, torch.float32)  # fp16/bf16 -> fp32
    f_s = resize_to(f_s.to(dtype), tuple(f_t.shape[2:]))  # (B, C_s, *S_t)
    q_s = attention_map(f_s, p)  # (B, prod(S_t))
    q_t = attention_map(f_t.to(dtype), p)  # (B, prod(S_t))
    return (q_s - q_t).pow(2).mean()


@register_loss("at")
class AT(FeatureLoss):
    """Attention transfer: ``sum_j mean (Q_s^j - Q_t^j)^2`` with ``Q = normalize(mean_c |A|^p)``.

    Shapes: every tapped pair is a feature map ``(B, C, L)`` or ``(B, C, H, W)``; channels may
    differ; the student map is resized to the teacher's spatial size. Default taps: all stage
    outputs, paired by relative depth. Set the paper's ``beta`` (1000 in RepDistiller) as
    the term's ``weight``.

    Args:
        p: Power in the attention map ``mean_c |A|^p`` (paper: 2).
        student_taps: Student module paths (default: stage outputs).
        teacher_taps: Teacher module paths, one per student path.
    """

    knowledge = "feature"
    citation = (
        "Zagoruyko, Komodakis. Paying More Attention to Attention: Improving the Performance of "
        "Convolutional Neural Networks via Attention Transfer. ICLR 2017."
    )
    default_taps = "stages"
    search_space = {
        "weight": Range(low=10.0, high=3000.0, log=True),  # paper/RepDistiller: 1000
    }

    def __init__(
        self,
        p: Annotated[float, Field(gt=0.0)] = 2.0,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.p = p

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        for (sp, tp), f_s, f_t in zip(self.pairs, self.student_features(student), self.teacher_features(teacher)):
            check_feature_map(f_s, f"losses.at: student tap {sp!r}")
            check_feature_map(f_t, f"losses.at: teacher tap {tp!r}")
            if f_s.dim() != f_t.dim():
                raise ShapeError(
                    f"losses.at: student tap {sp!r} {tuple(f_s.shape)} and teacher tap {tp!r} {tuple(f_t.shape)} "
                    "have different spatial ranks; pair 1-D maps with 1-D maps and 2-D with 2-D"
                )

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        losses = [at_loss(s, t, self.p) for s, t in zip(self.student_features(student), self.teacher_features(teacher))]
        return torch.stack(losses).sum()
