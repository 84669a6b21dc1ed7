"""Inter-Channel Correlation KD (ICKD): match the channels' correlation matrices.

Liu, Chen, Liu, Peng & Liu, "Exploring Inter-Channel Correlation for Diversity-Preserved
Knowledge Distillation", ICCV 2021, Sec. 3.2 (ICKD-C, the classification form).

The student's feature map ``F_s`` ``(B, C_s, *S_s)`` is first embedded by a 1x1 convolution
(no bias) + BatchNorm to the teacher's width ``C_t`` (authors' ``Embed``; always present,
also when the widths match). For a map ``F`` of shape ``(B, C, m)`` (``m = prod(S)``
positions) the inter-channel correlation (paper Eq. 4) is::

    ICC(F)[b] = F[b] F[b]^T                                          (B, C, C)

The authors' code (ADLab-AutoDrive/ICKD ``Cifar100/distiller_zoo/ICKD.py``) L2-normalizes
every row of ``ICC`` before comparing (so the paper's ``1 / (h w)`` factor cancels) and
averages the squared Frobenius distance over the batch and the rows::

    L = 1/(B C) * sum_b || rownorm(ICC(E(F_s)))[b] - rownorm(ICC(F_t))[b] ||_F^2

which is what is implemented. ``ICC`` is ``C x C``, so student and teacher spatial sizes may
differ (no resize). Several tap pairs are summed.

Defaults: the last stage output (the authors use the last feature map before pooling,
``feat[-2]``). Authors' CIFAR-100 objective: ``CE + 2.5 * ICKD`` (``-a 0 -b 2.5``; "ICKD+KL"
adds KD with weight 1): set ``weight: 2.5`` on the term. A vector tap ``(B, D)`` has no
channels-by-positions structure and is a ``ShapeError``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses import register_loss
from darkknowledge.losses.adapters import build_adapter
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.feature import FeatureLoss
from darkknowledge.search_space import Range


def icc_matrix(f: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Inter-channel correlation ``F F^T`` per sample, rows L2-normalized when ``normalize``.

    Args:
        f: Feature map ``(B, C, *S)``.
        normalize: L2-normalize each row (authors' code); else divide by ``prod(S)`` (paper).

    Returns:
        ``(B, C, C)``.
    """
    a = f.flatten(2)  # (B, C, m)
    g = torch.bmm(a, a.transpose(1, 2))  # (B, C, C)
    if normalize:
        return F.normalize(g, p=2.0, dim=2)  # (B, C, C), unit rows (a zero row stays 0)
    return g / a.shape[2]  # (B, C, C)


def ickd_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """``1/(B C) * sum_b ||rownorm(ICC_s) - rownorm(ICC_t)||_F^2`` for one (embedded) pair.

    Args:
        f_s: Student map ``(B, C, *S_s)`` (already embedded to the teacher's width ``C``).
        f_t: Teacher map ``(B, C, *S_t)``; a constant.

    Returns:
        Scalar >= 0; 0 when the maps are equal (or equal up to a positive scale per sample).
    """
    dtype = torch.promote_types(f_s.dtype, torch.float32)  # fp16/bf16 -> fp32
    g_s = icc_matrix(f_s.to(dtype))  # (B, C, C)
    g_t = icc_matrix(f_t.to(dtype))  # (B, C, C)
    bsz, ch = g_s.shape[0], g_s.shape[1]
    return (g_s - g_t).pow(2).sum() / (bsz * ch)


@register_loss("ickd")
class ICKD(FeatureLoss):
    """ICKD: ``1/(B C) sum ||rownorm(E(F_s) E(F_s)^T) - rownorm(F_t F_t^T)||_F^2``.

    Shapes: every tap is a feature map ``(B, C, L)`` or ``(B, C, H, W)``; the student map is
    embedded to the teacher's channels by a 1x1 conv (no bias) + BN (trained with the
    student); spatial sizes may differ. Default taps: the last stage output. Authors'
    CIFAR-100 weight: 2.5 (set as the term's ``weight``).

    Args:
        student_taps: Student module paths (default: last stage).
        teacher_taps: Teacher module paths, one per student path.
    """

    knowledge = "relation"
    citation = (
        "Liu, Chen, Liu, Peng, Liu. Exploring Inter-Channel Correlation for Diversity-Preserved Knowledge "
        "Distillation. ICCV 2021."
    )
    default_taps = "last_stage"
    search_space = {
        "weight": Range(low=0.5, high=10.0, log=True),  # authors: 2.5
    }

    def __init__(self, student_taps: list[str] | None = None, teacher_taps: list[str] | None = None) -> None:
        super().__init__(student_taps, teacher_taps)
        self.embeds = nn.ModuleList()

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        embeds = []
        for (sp, tp), f_s, f_t in zip(self.pairs, self.student_features(student), self.teacher_features(teacher)):
            for path, f, role in ((sp, f_s, "student"), (tp, f_t, "teacher")):
                if f.dim() not in (3, 4):
                    raise ShapeError(
                        f"losses.ickd: {role} tap {path!r} has shape {tuple(f.shape)}; ICKD needs feature maps "
                        "(B, C, L) or (B, C, H, W), not vectors: tap a convolutional stage (e.g. the last one)"
                    )
            if f_s.dim() != f_t.dim():
                raise ShapeError(
                    f"losses.ickd: student tap {sp!r} {tuple(f_s.shape)} and teacher tap {tp!r} "
                    f"{tuple(f_t.shape)} have different spatial ranks"
                )
            target = (int(f_t.shape[1]), *f_s.shape[2:])  # teacher width, the student's own positions
            embeds.append(build_adapter(tuple(f_s.shape[1:]), target, batch_norm=True, identity_if_equal=False))
        self.embeds = nn.ModuleList(embeds)  # moved to the batch device by the scheme after setup

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        losses = [
            ickd_loss(embed(s), t)
            for embed, s, t in zip(self.embeds, self.student_features(student), self.teacher_features(teacher))
        ]
        return torch.stack(losses).sum()
