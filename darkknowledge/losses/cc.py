"""Correlation Congruence KD: match the batch's kernel correlation matrices.

Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, "Correlation Congruence for Knowledge
Distillation", ICCV 2019, Sec. 3.2-3.3. For the embeddings ``f_1 .. f_b`` of a batch the
correlation matrix is ``C[i, j] = k(f_i, f_j)`` with a Gaussian RBF kernel approximated by its
order-``P`` Taylor series (Eq. 10-11; features L2-normalised so ``||f_i - f_j||^2 = 2 - 2 f_i.f_j``):

    k(x, y) = exp(-gamma ||x - y||^2) = exp(-2 gamma) exp(2 gamma x.y)
            ~ sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p! * (x.y)^p
    L_CC = 1/b^2 * || C_T - C_S ||_F^2

Defaults ``P = 2``, ``gamma = 0.4`` (the paper's CIFAR/ImageNet setting, also in the KD-Zoo
reimplementation of AberHu). By default the kernel runs on each side's flattened feature
(the correlation matrix is ``b x b``, so the widths may differ and no parameter is needed).
``embed: true`` puts RepDistiller's linear embeddings (``LinearEmbed`` to ``feat_dim = 128``,
one per side, built in :meth:`CC.setup`) in front of the kernel; the teacher's embedding is
then trainable too (trained by the student's optimizer, as in RepDistiller). It is not the
default because with a trainable teacher-side embedding the target itself moves and the two
embeddings can agree without the student's feature changing: on the MNIST-1D recipe (weight
0.02) the CC term fell to ~4e-6 within 10 epochs, carrying almost no signal, against ~1e-2 on
the raw features (weights 10-100).

Note: RepDistiller's ``distiller_zoo/CC.py`` itself computes a different quantity
(``mean_i sum_d |s_i - t_i|_d * |s_{i+1} - t_{i+1}|_d``, code from the authors); this module
implements the paper's kernel formulation instead. RepDistiller's CC weight ``-b 0.02``
belongs to that variant, so the recipe weight here is tuned separately.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.feature import FeatureLoss
from darkknowledge.search_space import Range


def taylor_rbf_correlation(embedding: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """``C[i, j] = sum_{p<=P} exp(-2 gamma) (2 gamma)^p / p! * (f_i . f_j)^p`` on unit-norm rows.

    Args:
        embedding: ``(B, D)``; rows are L2-normalised here.
        gamma: RBF kernel width ``gamma`` in ``exp(-gamma ||x - y||^2)``.
        order: Order ``P`` of the Taylor expansion.

    Returns:
        ``(B, B)``.
    """
    f = F.normalize(embedding, p=2, dim=1)  # (B, D)
    sim = f @ f.t()  # (B, B), cosine similarities
    corr = torch.zeros_like(sim)  # (B, B)
    for p in range(order + 1):
        corr = corr + math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) * sim.pow(p)  # (B, B)
    return corr


def cc_loss(student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """``1/b^2 * ||C_T - C_S||_F^2`` between two batches of embeddings.

    Args:
        student: ``(B, D_s)``.
        teacher: ``(B, D_t)``.
        gamma: RBF kernel width.
        order: Taylor order ``P``.

    Returns:
        Scalar; 0 when the two batches have the same cosine similarities.
    """
    c_s = taylor_rbf_correlation(student, gamma, order)  # (B, B)
    c_t = taylor_rbf_correlation(teacher, gamma, order)  # (B, B)
    return F.mse_loss(c_s, c_t, reduction="mean")  # sum of squares / B^2


@register_loss("cc")
class CC(FeatureLoss):
    """Correlation congruence (Peng et al. 2019): MSE between Taylor-RBF correlation matrices.

    Shapes: taps ``(B, ...)`` flattened to ``(B, D)``; with ``embed`` a linear layer per side
    maps them to ``(B, feat_dim)``. With several tap pairs the losses are summed.

    Args:
        gamma: Width of the Gaussian RBF kernel (paper: 0.4).
        order: Order ``P`` of the kernel's Taylor expansion (paper: 2).
        embed: Linear embeddings (student and teacher side) before the kernel (RepDistiller; default off).
        feat_dim: Width of the embeddings (RepDistiller: 128).
        student_taps: Student module paths (default: the penultimate feature).
        teacher_taps: Teacher module paths (default: the penultimate feature).
    """

    knowledge = "relation"
    citation = "Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang. Correlation Congruence for Knowledge Distillation. ICCV 2019."
    default_taps = "penultimate"
    search_space = {
        "weight": Range(low=1.0, high=100.0, log=True),  # kernel form on raw features: 10-100
        "gamma": Range(low=0.1, high=1.6, log=True),  # paper: 0.4
    }

    def __init__(
        self,
        gamma: Annotated[float, Field(gt=0.0)] = 0.4,
        order: Annotated[int, Field(ge=1, le=10)] = 2,
        embed: bool = False,
        feat_dim: Annotated[int, Field(ge=1)] = 128,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.gamma = gamma
        self.order = order
        self.embed = embed
        self.feat_dim = feat_dim
        self.embed_s = nn.ModuleList()
        self.embed_t = nn.ModuleList()

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        """Build one linear embedding per side and tap pair from the probed widths."""
        if teacher is None:
            raise ConfigError("loss 'cc' reads teacher features, but the run has no teacher")
        if not self.embed:
            return
        self.embed_s = nn.ModuleList(nn.Linear(f[0].numel(), self.feat_dim) for f in self.student_features(student))
        self.embed_t = nn.ModuleList(nn.Linear(f[0].numel(), self.feat_dim) for f in self.teacher_features(teacher))

    def _embed(self, feature: torch.Tensor, layer: nn.Module | None) -> torch.Tensor:
        x = feature.reshape(len(feature), -1)  # (B, D)
        x = layer(x) if layer is not None else x  # (B, feat_dim) or (B, D)
        return x.to(torch.promote_types(x.dtype, torch.float32))  # kernel powers in fp32

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        total: torch.Tensor | float = 0.0
        feats = zip(self.student_features(student), self.teacher_features(teacher))
        for i, (s, t) in enumerate(feats):
            e_s = self._embed(s, self.embed_s[i] if self.embed else None)  # (B, d)
            e_t = self._embed(t.detach(), self.embed_t[i] if self.embed else None)  # (B, d)
            total = total + cc_loss(e_s, e_t, self.gamma, self.order)
        return total  # type: ignore[return-value]  # a tensor: at least one pair
