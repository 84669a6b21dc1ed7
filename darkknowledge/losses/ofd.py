"""Overhaul of feature distillation (OFD): pre-ReLU features, a teacher margin, a partial L2.

Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of Feature Distillation",
ICCV 2019 (arXiv:1904.01866), Sec. 3.

* Teacher transform, margin ReLU: ``sigma_m(t) = max(t, m_c)`` with the per-channel
  margin ``m_c = E[t_c | t_c < 0]``, the expected negative response of channel ``c``.
* Student transform ``r(s)``: 1x1 conv (no bias) + BN on the student's *pre-ReLU* feature
  (the authors' ``build_feature_connector``, weights ``N(0, 2 / (k k C_t))``).
* Partial L2 distance: skip the positions where the student is already below a non-positive
  target::

      d(T, S) = sum_i 0                 if S_i <= T_i <= 0
                      (T_i - S_i)^2     otherwise,            T = sigma_m(t), S = r(s)

* Over the tapped pairs ``j = 1..n`` (shallow to deep) the authors' code
  (clovaai/overhaul-distillation ``CIFAR-100/distiller.py`` and ``train_with_distillation.py``)
  weights pair ``j`` by ``1 / 2^(n - j)`` and divides the sum by ``batch_size * 1000``::

      L = sum_j d(T_j, S_j) / 2^(n - j) / (B * 1000)

  so the paper's CIFAR setting is this term with weight 1 beside cross-entropy
  (mdistiller: ``FEAT_WEIGHT 0.001`` on the same sum divided by ``B``).

Margin: the paper derives ``m_c`` from the teacher's BN before the ReLU, assuming a Gaussian
``N(beta_c, gamma_c^2)`` (:func:`gaussian_margin`, the authors' ``get_margin_from_BN``). A tapped
teacher feature need not be a BN output, so here ``m_c`` is estimated from data: the mean of the
negative responses of channel ``c`` over every sample and position of one pass over the
training set in ``pretrain`` (until then, and when no pass is run, over the dry-run batch of
``setup``). A channel without negative responses gets ``m_c = 0``.

Pre-ReLU taps: with no taps given, each default stage output is replaced by the *input* of the
stage's last leaf module when that leaf is a (not in-place) ``nn.ReLU``: zoo CIFAR ResNets give
``layerK.<last block>.relu_out:input``, ``cnn1d`` gives ``blocks.i.1:input`` (the Conv1d output).
Otherwise (e.g. ``cnn2d``, whose stages end in a max-pool) the post-ReLU stage output is used;
its responses are >= 0, so the margin is 0 and the loss degrades to an L2 that ignores where the
student is <= 0 while the teacher is 0.

Shapes: maps ``(B, C, L)`` (Conv1d/BN1d connector) or ``(B, C, H, W)`` (Conv2d/BN2d); a vector
``(B, D)`` is a map of length 1. When spatial sizes differ, the connector's output is resized to
the teacher's (linear/bilinear); the paper pairs features of equal size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses import register_loss
from darkknowledge.losses.adapters import Resize
from darkknowledge.losses.base import Needs, Outputs, SetupInfo
from darkknowledge.losses.feature import FeatureLoss, default_paths, pre_activation_tap
from darkknowledge.losses.vid import as_map, paired_maps
from darkknowledge.pairs import align_by_depth
from darkknowledge.search_space import Range

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


def ofd_partial_l2(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """``sum (S - T)^2`` over positions not having ``S <= T <= 0``, with ``T = max(t, margin)``.

    Args:
        s: Transformed student feature ``(B, C, *S)``.
        t: Teacher pre-ReLU feature ``(B, C, *S)`` (constant).
        margin: Per-channel margins ``(C,)``, all <= 0.

    Returns:
        Scalar sum (not averaged) over batch, channels and positions.
    """
    m = margin.view(1, -1, *([1] * (t.dim() - 2)))  # (1, C, 1, ...)
    target = torch.maximum(t, m)  # (B, C, *S), margin ReLU
    keep = (s > target) | (target > 0)  # (B, C, *S), i.e. not (s <= target <= 0)
    return ((s - target).pow(2) * keep).sum()


def negative_stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sum and count of the negative entries of ``t`` ``(B, C, *S)`` -> ``(C,), (C,)``."""
    dims = [0, *range(2, t.dim())]
    return t.clamp(max=0).sum(dim=dims), (t < 0).sum(dim=dims)  # (C,), (C,)


def margin_from_stats(neg_sum: torch.Tensor, neg_count: torch.Tensor) -> torch.Tensor:
    """``E[t | t < 0]`` per channel from :func:`negative_stats` totals; 0 for channels never negative."""
    return torch.where(neg_count > 0, neg_sum / neg_count.clamp(min=1), torch.zeros_like(neg_sum))  # (C,)


def gaussian_margin(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Closed-form ``E[x | x < 0]`` for ``x ~ N(mean, std^2)`` per channel (the paper's BN margin).

    ``m = mean - std * phi(mean/std) / Phi(-mean/std)``; where ``Phi(-mean/std) <= 0.001`` the
    authors' code uses ``-3 std`` instead.

    Args:
        mean: ``(C,)`` (BN bias ``beta``).
        std: ``(C,)`` (BN weight ``|gamma|``).
    """
    std = std.abs()
    z = mean / std  # (C,)
    tail = torch.special.ndtr(-z)  # (C,) = P(x < 0)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # (C,)
    exact = mean - std * pdf / tail.clamp(min=1e-12)  # (C,)
    return torch.where(tail > 0.001, exact, -3.0 * std)


@register_loss("ofd")
class OFD(FeatureLoss):
    """OFD: ``sum_j partial_L2(r(s_j), max(t_j, m_j)) / 2^(n-j) / (1000 B)`` on pre-ReLU features.

    Shapes: maps ``(B, C, L)`` / ``(B, C, H, W)`` or vectors ``(B, D)``; channels and spatial
    sizes may differ (connector 1x1 conv + BN, then resized to the teacher). Default taps: the
    pre-ReLU stage outputs where the model exposes them (see module docstring). Paper weight: 1.

    Args:
        margin_from: ``train_set``: estimate the teacher margins over one pass of the training
            set before training (``pretrain``); ``first_batch``: from the dry-run batch only.
        student_taps: Student module paths (default: pre-ReLU stage outputs).
        teacher_taps: Teacher module paths, one per student path.
    """

    knowledge = "feature"
    citation = "Heo, Kim, Yun, Park, Kwak, Choi. A Comprehensive Overhaul of Feature Distillation. ICCV 2019."
    default_taps = "stages"
    search_space = {
        "weight": Range(low=0.3, high=10.0, log=True),  # authors: 1 (the sum / 1000 B is built in)
    }

    def __init__(
        self,
        margin_from: Literal["train_set", "first_batch"] = "train_set",
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.margin_from = margin_from
        self.connectors = nn.ModuleList()

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> Needs:
        if teacher is None:
            raise ConfigError("loss 'ofd' reads teacher features, but the run has no teacher")
        given = (self.student_taps, self.teacher_taps)
        try:
            s = self.student_taps or [
                pre_activation_tap(student, p) for p in default_paths(student, "stages", "student")
            ]
            t = self.teacher_taps or [
                pre_activation_tap(teacher, p) for p in default_paths(teacher, "stages", "teacher")
            ]
            if len(s) != len(t) and not (self.student_taps and self.teacher_taps):
                s, t = align_by_depth(s, t)
            self.student_taps, self.teacher_taps = s, t
            return super().bind(student, teacher)
        finally:
            self.student_taps, self.teacher_taps = given

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        self.connectors = nn.ModuleList()
        for i, ((sp, tp), f_s, f_t) in enumerate(
            zip(self.pairs, self.student_features(student), self.teacher_features(teacher))
        ):
            f_s, f_t = paired_maps(f_s, f_t, sp, tp, "ofd")
            dims, c_s, c_t = f_s.dim() - 2, int(f_s.shape[1]), int(f_t.shape[1])
            conv = _CONV[dims](c_s, c_t, kernel_size=1, bias=False)
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / c_t))  # authors: N(0, 2 / (k*k*C_out)), k = 1
            layers: list[nn.Module] = [conv, _BN[dims](c_t)]
            if f_s.shape[2:] != f_t.shape[2:]:
                layers.append(Resize(tuple(f_t.shape[2:])))
            self.connectors.append(nn.Sequential(*layers))
            self.register_buffer(f"margin{i}", margin_from_stats(*negative_stats(f_t.detach().float())))

    def margins(self) -> list[torch.Tensor]:
        """The per-channel teacher margins ``(C_t,)`` of every pair."""
        return [getattr(self, f"margin{i}") for i in range(len(self.connectors))]

    @torch.no_grad()
    def pretrain(self, teacher_batches: Callable[[], Iterator[Outputs]]) -> None:
        """Estimate ``m_c = E[t_c | t_c < 0]`` over one pass of the training set's teacher outputs."""
        if self.margin_from != "train_set" or not len(self.connectors):
            return
        sums = [torch.zeros_like(m, dtype=torch.float64) for m in self.margins()]
        counts = [torch.zeros_like(m, dtype=torch.float64) for m in self.margins()]
        for out in teacher_batches():
            for j, f_t in enumerate(self.teacher_features(out)):
                s, c = negative_stats(as_map(f_t, "teacher").double())
                sums[j] += s
                counts[j] += c
        for j, m in enumerate(self.margins()):
            m.copy_(margin_from_stats(sums[j], counts[j]).to(m.dtype))

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        n, batch_size = len(self.connectors), 1
        total = 0.0
        feats = zip(self.student_features(student), self.teacher_features(teacher), self.connectors, self.margins())
        for j, (f_s, f_t, conn, margin) in enumerate(feats):
            s = conn(as_map(f_s, "student"))  # (B, C_t, *S_t)
            batch_size = s.shape[0]
            dtype = torch.promote_types(s.dtype, torch.float32)  # fp16/bf16 -> fp32 for the sum
            t = as_map(f_t, "teacher").to(dtype)  # (B, C_t, *S_t)
            total = total + ofd_partial_l2(s.to(dtype), t, margin.to(dtype)) / 2 ** (n - j - 1)
        return total / (batch_size * 1000.0)  # type: ignore[return-value]  # a tensor: at least one pair
