"""Variational information distillation (VID): maximise a variational lower bound on I(t; s).

Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation for Knowledge
Transfer", CVPR 2019 (arXiv:1904.05835), Sec. 3.

For each tapped pair, the teacher feature ``t`` ``(B, C_t, *S)`` is modelled as a Gaussian
with a mean regressed from the student feature ``s`` and a learned per-channel variance
(the paper's choice for intermediate layers: one variance per channel, shared over positions)::

    mu(s)     = conv1x1( ReLU( conv1x1( ReLU( conv1x1(s) ) ) ) )        (B, C_t, *S)
    sigma_c^2 = softplus(alpha_c) + eps                                 (C_t,)
    L_pair    = mean_{b, c, x} [ log sigma_c^2 + (t_{b,c,x} - mu_{b,c,x})^2 / sigma_c^2 ] / 2
    L         = sum_pairs L_pair

``L_pair`` is the Gaussian negative log-likelihood ``-log N(t; mu, sigma^2)`` minus the
constant ``log(2 pi) / 2``, averaged over batch, channels and positions. Minimising it over
the student, the regressor and ``alpha`` maximises the variational bound on the mutual
information (paper Sec. 3).

Defaults follow the authors' code as packaged in HobbitLong/RepDistiller
(``distiller_zoo/VID.py``, ``VIDLoss(s, t, t)``): three bias-free 1x1 convs with ReLUs, middle
width = teacher channels, ``init_pred_var = 5`` (``alpha`` starts at
``log(exp(5 - eps) - 1)`` so that ``sigma^2 = 5``), ``eps = 1e-5``, loss weight 1 (RepDistiller
CIFAR-100 ``-b 1``), every stage output paired (RepDistiller ``feat[1:-1]``).

Shapes: 2-D maps use ``Conv2d``, 1-D maps ``(B, C, L)`` (MNIST-1D CNNs) ``Conv1d``; a vector
``(B, D)`` is treated as a map of length 1. When spatial sizes differ, the larger map is
adaptive-average-pooled to the smaller one, as RepDistiller does. The regressors and
``alpha`` are children of the loss (trained with the student).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.feature import FeatureLoss
from darkknowledge.search_space import Range

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_POOL: dict[int, Callable[..., torch.Tensor]] = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d}


def as_map(x: torch.Tensor, where: str) -> torch.Tensor:
    """``(B, D)`` -> ``(B, D, 1)``; ``(B, C, L)`` and ``(B, C, H, W)`` unchanged; other ranks raise."""
    if x.dim() == 2:
        return x.unsqueeze(-1)  # (B, D, 1)
    if x.dim() not in (3, 4):
        raise ShapeError(f"{where} has shape {tuple(x.shape)}; expected (B, D), (B, C, L) or (B, C, H, W)")
    return x


def paired_maps(f_s: torch.Tensor, f_t: torch.Tensor, sp: str, tp: str, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both features as maps (:func:`as_map`); a 1-D map paired with a 2-D one raises ``ShapeError``."""
    f_s, f_t = as_map(f_s, f"student tap {sp!r}"), as_map(f_t, f"teacher tap {tp!r}")
    if f_s.dim() != f_t.dim():
        raise ShapeError(
            f"losses.{loss}: student tap {sp!r} {tuple(f_s.shape)} and teacher tap {tp!r} {tuple(f_t.shape)} "
            "are maps of different rank; pair 1-D with 1-D and 2-D with 2-D features"
        )
    return f_s, f_t


def pool_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Adaptive average pooling of ``(B, C, *S)`` to ``(B, C, *size)`` (identity when equal)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return _POOL[x.dim() - 2](x, tuple(size))  # (B, C, *size)


def vid_nll(mean: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Gaussian NLL (minus ``log(2 pi)/2``) of ``target`` under ``N(mean, softplus(alpha) + eps)``.

    Args:
        mean: Regressed mean ``(B, C, *S)``.
        target: Teacher feature ``(B, C, *S)`` (constant).
        alpha: Per-channel pre-softplus variance parameter ``(C,)``.
        eps: Variance floor.

    Returns:
        Scalar: ``mean_{b,c,x} [log var_c + (t - mu)^2 / var_c] / 2``.
    """
    var = F.softplus(alpha) + eps  # (C,)
    var = var.view(1, -1, *([1] * (target.dim() - 2)))  # (1, C, 1, ...)
    nll = 0.5 * ((mean - target).pow(2) / var + var.log())  # (B, C, *S)
    return nll.mean()


def regressor(dims: int, c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """The VID mean regressor: three bias-free 1x1 convs with ReLU between them."""
    conv = _CONV[dims]
    return nn.Sequential(
        conv(c_in, c_mid, kernel_size=1, bias=False),
        nn.ReLU(),
        conv(c_mid, c_mid, kernel_size=1, bias=False),
        nn.ReLU(),
        conv(c_mid, c_out, kernel_size=1, bias=False),
    )


@register_loss("vid")
class VID(FeatureLoss):
    """VID: ``sum_pairs mean [log sigma^2 + (t - mu(s))^2 / sigma^2] / 2`` (Gaussian NLL).

    Shapes: each pair is a feature map ``(B, C, L)`` / ``(B, C, H, W)`` or a vector ``(B, D)``;
    channels and spatial sizes may differ (the larger map is average-pooled to the smaller).
    Default taps: every stage output, paired by relative depth. Paper/RepDistiller weight: 1.

    Args:
        init_pred_var: Initial variance ``sigma^2`` of every channel (authors: 5.0).
        eps: Variance floor added after the softplus (authors: 1e-5).
        mid_channels: Width of the regressor's hidden convs (0: the teacher's channel count,
            as RepDistiller).
        student_taps: Student module paths (default: stage outputs).
        teacher_taps: Teacher module paths, one per student path.
    """

    knowledge = "feature"
    citation = (
        "Ahn, Hu, Damianou, Lawrence, Dai. Variational Information Distillation for Knowledge Transfer. CVPR 2019."
    )
    default_taps = "stages"
    search_space = {
        "weight": Range(low=0.3, high=30.0, log=True),  # paper/RepDistiller: 1
    }

    def __init__(
        self,
        init_pred_var: Annotated[float, Field(gt=0.0)] = 5.0,
        eps: Annotated[float, Field(gt=0.0)] = 1e-5,
        mid_channels: Annotated[int, Field(ge=0)] = 0,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        if init_pred_var <= eps:
            raise ConfigError(f"losses.vid: init_pred_var ({init_pred_var}) must exceed eps ({eps})")
        self.init_pred_var = init_pred_var
        self.eps = eps
        self.mid_channels = mid_channels
        self.regressors = nn.ModuleList()
        self.alphas = nn.ParameterList()

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        self.regressors = nn.ModuleList()
        self.alphas = nn.ParameterList()
        init = math.log(math.expm1(self.init_pred_var - self.eps))  # softplus(init) + eps = init_pred_var
        for (sp, tp), f_s, f_t in zip(self.pairs, self.student_features(student), self.teacher_features(teacher)):
            f_s, f_t = as_map(f_s, f"student tap {sp!r}"), as_map(f_t, f"teacher tap {tp!r}")
            if f_s.dim() != f_t.dim():
                raise ShapeError(
                    f"losses.vid: student tap {sp!r} {tuple(f_s.shape)} and teacher tap {tp!r} {tuple(f_t.shape)} "
                    "are maps of different rank; pair 1-D with 1-D and 2-D with 2-D features"
                )
            c_s, c_t = int(f_s.shape[1]), int(f_t.shape[1])
            self.regressors.append(regressor(f_s.dim() - 2, c_s, self.mid_channels or c_t, c_t))
            self.alphas.append(nn.Parameter(torch.full((c_t,), init)))

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        total: torch.Tensor | float = 0.0
        feats = zip(self.student_features(student), self.teacher_features(teacher), self.regressors, self.alphas)
        for f_s, f_t, reg, alpha in feats:
            f_s, f_t = as_map(f_s, "student"), as_map(f_t, "teacher")  # (B, C_s, *S_s), (B, C_t, *S_t)
            size = tuple(min(a, b) for a, b in zip(f_s.shape[2:], f_t.shape[2:]))
            mean = reg(pool_to(f_s, size))  # (B, C_t, *size)
            dtype = torch.promote_types(mean.dtype, torch.float32)  # fp16/bf16 -> fp32 for the NLL
            target = pool_to(f_t.to(dtype), size)  # (B, C_t, *size)
            total = total + vid_nll(mean.to(dtype), target, alpha.to(dtype), self.eps)
        return total  # type: ignore[return-value]  # a tensor: at least one pair
