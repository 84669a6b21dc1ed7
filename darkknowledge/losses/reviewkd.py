"""Knowledge review (ReviewKD): fuse the student's stages deep-to-shallow, compare each fused
feature with the teacher's feature of the same stage at several scales.

Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021
(arXiv:2104.09044), Sec. 3 (residual learning framework, ABF, HCL).

For tapped pairs ``j = 1..n`` (shallow to deep), student features ``s_j`` ``(B, C_s^j, *S_s^j)``
and teacher features ``t_j`` ``(B, C_t^j, *S_t^j)``:

* Attention-based fusion (ABF), run from ``j = n`` down to 1 (authors' ``ABF``)::

      x_j = BN(conv1x1(s_j))                                   (B, M, *S_s^j), M = min(512, C_s^n)
      if j < n:  r = nearest_resize(x_{j+1}', S_s^j)           residual from the deeper stage
                 [a, b] = sigmoid(conv1x1([x_j, r]))           (B, 2, *S_s^j)
                 x_j = a * x_j + b * r
      x_j' = nearest_resize(x_j, S_t^j)                        passed on to stage j - 1
      y_j = BN(conv3x3(x_j'))                                  (B, C_t^j, *S_t^j)

* Hierarchical context loss (HCL, authors' ``hcl``): MSE at full resolution plus MSE after
  adaptive average pooling to ``4, 2, 1`` (levels ``>= `` the first spatial size are skipped),
  with weights ``1, 1/2, 1/4, 1/8`` normalised by their sum::

      HCL(y, t) = [ mse(y, t) + sum_k 2^-k mse(pool_k(y), pool_k(t)) ] / (1 + sum_k 2^-k)
      L = sum_j HCL(y_j, t_j)

Defaults from dvlab-research/ReviewKD (``CIFAR-100/model/reviewkd.py``, ``train.py``) and
mdistiller: loss weight 1.0, warm-up of the weight over the first 20 of 240 epochs (set
``warmup_epochs`` on the term), ``M = min(512, C_s)``, kaiming-uniform (``a = 1``) conv init.
The authors also use the pooled penultimate feature as the deepest level (``penultimate:
true`` adds the ``fc:input`` pair, as a map of size 1) and compare against the teacher's
*pre-ReLU* stage outputs; the default taps here are the stage outputs of both models (give
``teacher_taps`` to use pre-ReLU ones, e.g. ``layer1.2.relu_out:input`` on zoo ResNets).

Shapes: 1-D maps use ``Conv1d``/``BatchNorm1d``, 2-D maps ``Conv2d``/``BatchNorm2d``; vectors
``(B, D)`` become maps of size 1; all pairs must have the same map rank. Channels and spatial
sizes may differ between student and teacher: ABF outputs have the teacher's shape. The ABF
modules are children of the loss (trained with the student).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import Needs, Outputs, SetupInfo
from darkknowledge.losses.feature import FeatureLoss, penultimate_tap
from darkknowledge.search_space import Range

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_POOL: dict[int, Callable[..., torch.Tensor]] = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d}


def hcl(f_s: list[torch.Tensor], f_t: list[torch.Tensor], levels: tuple[int, ...] = (4, 2, 1)) -> torch.Tensor:
    """Hierarchical context loss summed over pairs of equally shaped maps ``(B, C, *S)``.

    Args:
        f_s: Fused student features, each ``(B, C_j, *S_j)``.
        f_t: Teacher features, same shapes.
        levels: Pooled sizes (skipped when ``>=`` the first spatial dim).

    Returns:
        Scalar >= 0; 0 when the features are equal.
    """
    total: torch.Tensor | float = 0.0
    for s, t in zip(f_s, f_t):
        loss = F.mse_loss(s, t)  # scalar, full resolution
        weight, norm = 1.0, 1.0
        h = s.shape[2] if s.dim() > 2 else 1
        for level in levels:
            if level >= h:
                continue
            size = (level,) * (s.dim() - 2)
            weight /= 2.0
            loss = loss + weight * F.mse_loss(_POOL[s.dim() - 2](s, size), _POOL[s.dim() - 2](t, size))
            norm += weight
        total = total + loss / norm
    return total  # type: ignore[return-value]  # a tensor: at least one pair


class ABF(nn.Module):
    """Attention-based fusion of one student stage with the residual from the deeper stage.

    Args:
        dims: 1 or 2 spatial dims.
        in_channels: Student channels of this stage.
        mid_channels: Fusion width ``M``.
        out_channels: Teacher channels of this stage.
        fuse: False for the deepest stage (nothing to fuse).
    """

    def __init__(self, dims: int, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        conv, bn = _CONV[dims], _BN[dims]
        conv1 = conv(in_channels, mid_channels, kernel_size=1, bias=False)
        self.conv1 = nn.Sequential(conv1, bn(mid_channels))
        conv2 = conv(mid_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Sequential(conv2, bn(out_channels))
        self.att_conv = nn.Sequential(conv(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(conv1.weight, a=1)
        nn.init.kaiming_uniform_(conv2.weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, C_s, *S_s)``, residual ``(B, M, *S')`` -> (output ``(B, C_t, *out_size)``,
        residual ``(B, M, *out_size)``)."""
        x = self.conv1(x)  # (B, M, *S_s)
        if self.att_conv is not None and residual is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[2:]), mode="nearest")  # (B, M, *S_s)
            z = self.att_conv(torch.cat([x, residual], dim=1))  # (B, 2, *S_s)
            x = x * z[:, :1] + residual * z[:, 1:2]  # (B, M, *S_s)
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")  # (B, M, *out_size)
        return self.conv2(x), x


def _to_rank(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Append size-1 spatial dims: ``(B, D)`` -> ``(B, D, 1)`` or ``(B, D, 1, 1)``."""
    while x.dim() < rank:
        x = x.unsqueeze(-1)
    return x


@register_loss("reviewkd")
class ReviewKD(FeatureLoss):
    """Knowledge review: ABF fusion of student stages deep-to-shallow, HCL against the teacher stages.

    Shapes: maps ``(B, C, L)`` / ``(B, C, H, W)`` (vectors as size-1 maps), one rank for all
    pairs; channels and spatial sizes may differ. Default taps: every stage output, paired by
    relative depth. Authors: weight 1.0, ``warmup_epochs`` 20 (of 240).

    Args:
        penultimate: Also use the penultimate feature (``fc:input``) as the deepest level, as the authors do.
        max_mid_channels: Cap of the fusion width ``M = min(max_mid_channels, C_s^deepest)`` (authors: 512).
        student_taps: Student module paths (default: stage outputs).
        teacher_taps: Teacher module paths, one per student path.
    """

    knowledge = "feature"
    citation = "Chen, Liu, Zhao, Jia. Distilling Knowledge via Knowledge Review. CVPR 2021."
    default_taps = "stages"
    search_space = {
        "weight": Range(low=0.5, high=8.0, log=True),  # authors: 1
    }

    def __init__(
        self,
        penultimate: bool = False,
        max_mid_channels: Annotated[int, Field(ge=1)] = 512,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.penultimate = penultimate
        self.max_mid_channels = max_mid_channels
        self.abfs = nn.ModuleList()
        self.rank = 4

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> Needs:
        needs = super().bind(student, teacher)
        if not self.penultimate:
            return needs
        assert teacher is not None  # FeatureLoss.bind refuses a teacher without features
        sp, tp = penultimate_tap(student), penultimate_tap(teacher)
        self.pairs.append((sp, tp))
        return replace(
            needs,
            student_taps=tuple(dict.fromkeys((*needs.student_taps, sp))),
            teacher_taps=tuple(dict.fromkeys((*needs.teacher_taps, tp))),
        )

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        f_s, f_t = self.student_features(student), self.teacher_features(teacher)
        map_ranks = {f.dim() for f in (*f_s, *f_t) if f.dim() > 2}
        if len(map_ranks) > 1 or any(f.dim() > 4 or f.dim() < 2 for f in (*f_s, *f_t)):
            shapes = {p: tuple(f.shape) for (p, _), f in zip(self.pairs, f_s)} | {
                p: tuple(f.shape) for (_, p), f in zip(self.pairs, f_t)
            }
            raise ShapeError(
                f"losses.reviewkd: the tapped features must all be 1-D maps (B, C, L) or all 2-D maps "
                f"(B, C, H, W) (vectors are allowed); got {shapes}"
            )
        self.rank = map_ranks.pop() if map_ranks else 3
        f_s = [_to_rank(f, self.rank) for f in f_s]
        f_t = [_to_rank(f, self.rank) for f in f_t]
        mid = min(self.max_mid_channels, int(f_s[-1].shape[1]))
        n = len(f_s)
        self.abfs = nn.ModuleList(
            ABF(self.rank - 2, int(s.shape[1]), mid, int(t.shape[1]), fuse=j < n - 1)
            for j, (s, t) in enumerate(zip(f_s, f_t))
        )

    def fuse(self, f_s: list[torch.Tensor], out_sizes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """ABF outputs in pair order (shallow to deep), each ``(B, C_t^j, *out_sizes[j])``."""
        results: list[torch.Tensor] = []
        residual = None
        for j in reversed(range(len(f_s))):
            y, residual = self.abfs[j](_to_rank(f_s[j], self.rank), residual, out_sizes[j])
            results.insert(0, y)
        return results

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        f_t = [_to_rank(f, self.rank) for f in self.teacher_features(teacher)]  # (B, C_t^j, *S_t^j)
        fused = self.fuse(self.student_features(student), [tuple(f.shape[2:]) for f in f_t])
        dtype = torch.promote_types(fused[0].dtype, torch.float32)  # fp16/bf16 -> fp32 for the loss
        return hcl([y.to(dtype) for y in fused], [t.to(dtype) for t in f_t])
