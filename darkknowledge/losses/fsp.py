"""Flow of Solution Procedure (FSP): match the Gram matrices between consecutive layers.

Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning", CVPR 2017, Sec. 3.2-3.3.

For two feature maps of the SAME network, ``F1`` of shape ``(B, C1, *S)`` and ``F2`` of shape
``(B, C2, *S)`` (``S`` = ``(L,)`` or ``(H, W)``, ``m = prod(S)`` positions), the FSP matrix
(paper Eq. 1) is::

    G(F1, F2)[b, i, j] = 1/m * sum_x F1[b, i, x] * F2[b, j, x]          (B, C1, C2)

When the two layers differ in spatial size, the larger map is adaptive-average-pooled to the
smaller one (HobbitLong/RepDistiller ``distiller_zoo/FSP.py``). The taps ``l_1 .. l_n`` of
each model give ``n - 1`` matrices from consecutive taps, and (paper Eq. 2 with equal
``lambda_i``)::

    L = sum_{k=1}^{n-1} mean_{b,i,j} ( G_s^k - G_t^k )^2

The per-matrix mean (rather than the paper's sum over the ``C1 x C2`` entries, averaged over
the batch) and the sum over matrices follow RepDistiller (``compute_loss`` and
``sum(loss_group)``); the paper's value is ``C1 * C2`` times each term.

Channel counts: the paper (and RepDistiller, which raises "num of channels not equal") needs
the student's ``C1, C2`` to equal the teacher's. With ``channel_mismatch="adapt"`` (default),
each student tap whose width differs from its paired teacher tap gets a 1x1 convolution +
BatchNorm (:func:`build_adapter`, spatial size kept) mapping it to the teacher's width; the
adapters train with the student. ``channel_mismatch="error"`` raises a ``ShapeError`` naming
the shapes instead (RepDistiller's behaviour). Vector taps ``(B, D)`` are a ``ShapeError``.

Schedule: the paper (and RepDistiller's ``init`` stage, 30 epochs) first trains the student
with the FSP loss alone, then trains on the main task. Express it with term windows in a
recipe: ``fsp: {stop_epoch: N}`` and ``ce: {start_epoch: N}``.

Default taps: every stage output of each model (``default_taps = "stages"``), paired by
relative depth; pick explicit ``student_taps``/``teacher_taps`` (section input and output) to
follow the paper's layout when the depths differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses import register_loss
from darkknowledge.losses.adapters import build_adapter
from darkknowledge.losses.base import Needs, Outputs, SetupInfo
from darkknowledge.losses.feature import FeatureLoss
from darkknowledge.search_space import Range


def pool_to(f: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Adaptive-average-pool the spatial dims of ``f`` ``(B, C, *S)`` to ``size`` (identity if equal)."""
    if tuple(f.shape[2:]) == tuple(size):
        return f
    pool: Callable[..., torch.Tensor] = F.adaptive_avg_pool1d if len(size) == 1 else F.adaptive_avg_pool2d
    return pool(f, size)  # (B, C, *size)


def fsp_matrix(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """FSP matrix ``G[b, i, j] = mean_x f1[b, i, x] * f2[b, j, x]`` (paper Eq. 1).

    Args:
        f1: Earlier layer ``(B, C1, *S1)``.
        f2: Later layer ``(B, C2, *S2)``; the larger of ``S1``/``S2`` is pooled to the smaller
            (per dim).

    Returns:
        ``(B, C1, C2)``.
    """
    if f1.dim() not in (3, 4) or f1.dim() != f2.dim():
        raise ShapeError(
            f"FSP needs two feature maps of the same rank, (B, C, L) or (B, C, H, W); got {tuple(f1.shape)} "
            f"and {tuple(f2.shape)}"
        )
    size = tuple(min(a, b) for a, b in zip(f1.shape[2:], f2.shape[2:]))
    a = pool_to(f1, size).flatten(2)  # (B, C1, m)
    b = pool_to(f2, size).flatten(2)  # (B, C2, m)
    return torch.bmm(a, b.transpose(1, 2)) / a.shape[2]  # (B, C1, C2)


def fsp_loss(feats_s: list[torch.Tensor], feats_t: list[torch.Tensor]) -> torch.Tensor:
    """``sum_k mean (G(s_k, s_{k+1}) - G(t_k, t_{k+1}))^2`` over consecutive taps.

    Args:
        feats_s: Student maps, shallow to deep; channels must already match the teacher's.
        feats_t: Teacher maps, one per student map (constants).

    Returns:
        Scalar >= 0; 0 when the features are equal.
    """
    dtype = torch.promote_types(feats_s[0].dtype, torch.float32)  # fp16/bf16 -> fp32
    losses = []
    for k in range(len(feats_s) - 1):
        g_s = fsp_matrix(feats_s[k].to(dtype), feats_s[k + 1].to(dtype))  # (B, C1, C2)
        g_t = fsp_matrix(feats_t[k].to(dtype), feats_t[k + 1].to(dtype))  # (B, C1, C2)
        if g_s.shape != g_t.shape:
            raise ShapeError(f"FSP matrices differ in shape: student {tuple(g_s.shape)}, teacher {tuple(g_t.shape)}")
        losses.append((g_s - g_t).pow(2).mean())
    return torch.stack(losses).sum()


@register_loss("fsp")
class FSP(FeatureLoss):
    """FSP: ``sum_k mean (G_s^k - G_t^k)^2`` with ``G`` the Gram matrix of consecutive taps.

    Shapes: at least two taps per model, each a feature map ``(B, C, L)`` or ``(B, C, H, W)``;
    within a model, spatial sizes may differ (pooled to the smaller). Student widths that
    differ from the teacher's get 1x1 conv + BN adapters (``channel_mismatch="adapt"``) or
    raise (``"error"``). Default taps: all stage outputs, paired by relative depth.

    Args:
        channel_mismatch: ``"adapt"`` (1x1 conv + BN on the student) or ``"error"`` (ShapeError).
        student_taps: Student module paths, shallow to deep (at least 2).
        teacher_taps: Teacher module paths, one per student path.
    """

    knowledge = "relation"
    citation = (
        "Yim, Joo, Bae, Kim. A Gift from Knowledge Distillation: Fast Optimization, Network Minimization "
        "and Transfer Learning. CVPR 2017."
    )
    default_taps = "stages"
    search_space = {
        "weight": Range(low=1.0, high=100.0, log=True),  # RepDistiller: 50
    }

    def __init__(
        self,
        channel_mismatch: Literal["adapt", "error"] = "adapt",
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.channel_mismatch = channel_mismatch
        self.adapters = nn.ModuleList()

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> Needs:
        needs = super().bind(student, teacher)
        if len(self.pairs) < 2:
            raise ConfigError(
                f"losses.fsp: FSP needs at least 2 tap pairs (consecutive layers), got {self.pairs}; give "
                "student_taps/teacher_taps with two or more paths each, e.g. ['blocks.0', 'blocks.1']"
            )
        return needs

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        adapters = []
        for (sp, tp), f_s, f_t in zip(self.pairs, self.student_features(student), self.teacher_features(teacher)):
            for path, f, role in ((sp, f_s, "student"), (tp, f_t, "teacher")):
                if f.dim() not in (3, 4):
                    raise ShapeError(
                        f"losses.fsp: {role} tap {path!r} has shape {tuple(f.shape)}; FSP needs feature maps "
                        "(B, C, L) or (B, C, H, W), not vectors: tap convolutional stages"
                    )
            if f_s.dim() != f_t.dim():
                raise ShapeError(
                    f"losses.fsp: student tap {sp!r} {tuple(f_s.shape)} and teacher tap {tp!r} {tuple(f_t.shape)} "
                    "have different spatial ranks"
                )
            if f_s.shape[1] != f_t.shape[1] and self.channel_mismatch == "error":
                raise ShapeError(
                    f"losses.fsp: student tap {sp!r} {tuple(f_s.shape)} has {f_s.shape[1]} channels but teacher tap "
                    f"{tp!r} {tuple(f_t.shape)} has {f_t.shape[1]}; FSP compares C1 x C2 matrices and needs equal "
                    "widths (use channel_mismatch: adapt, or same-width tap pairs)"
                )
            target = (int(f_t.shape[1]), *f_s.shape[2:])  # teacher width, student spatial size
            adapters.append(build_adapter(tuple(f_s.shape[1:]), target))
        self.adapters = nn.ModuleList(adapters)  # moved to the batch device by the scheme after setup

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        feats_s = [adapt(f) for adapt, f in zip(self.adapters, self.student_features(student))]
        return fsp_loss(feats_s, self.teacher_features(teacher))
