"""Adapters that map a student feature onto a teacher feature's shape.

Built from the shapes a dry run probed, so nobody types channel counts:

* ``(D_s,) -> (D_t,)``: a linear layer.
* ``(C_s, L_s) -> (C_t, L_t)``: 1x1 ``Conv1d`` (+ BatchNorm), linear interpolation on length.
* ``(C_s, H_s, W_s) -> (C_t, H_t, W_t)``: 1x1 ``Conv2d`` + BatchNorm (the FitNets/CRD
  regressor form), bilinear resize when the spatial sizes differ.

Adapters belong to the loss that builds them and so to the trainable module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.errors import ShapeError


class Resize(nn.Module):
    """Interpolate the trailing spatial dims to ``size`` (identity when already that size)."""

    def __init__(self, size: tuple[int, ...]) -> None:
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, *S) -> (B, C, *size)
        if tuple(x.shape[2:]) == self.size:
            return x
        mode = "linear" if len(self.size) == 1 else "bilinear"
        return F.interpolate(x, size=self.size, mode=mode, align_corners=False)


def build_adapter(
    student_shape: tuple[int, ...],
    teacher_shape: tuple[int, ...],
    batch_norm: bool = True,
    identity_if_equal: bool = True,
) -> nn.Module:
    """Return a module mapping a student feature ``(B, *student_shape)`` to ``(B, *teacher_shape)``.

    Args:
        student_shape: Per-sample student feature shape (no batch dim).
        teacher_shape: Per-sample teacher feature shape.
        batch_norm: Add BatchNorm after the 1x1 convolution.
        identity_if_equal: Return ``nn.Identity`` when the shapes already match.

    Raises:
        ShapeError: When the feature ranks differ (e.g. a vector against a feature map).
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s == t and identity_if_equal:
        return nn.Identity()
    if len(s) != len(t):
        raise ShapeError(
            f"cannot adapt a student feature of shape {s} to a teacher feature of shape {t}: "
            "tap layers of the same kind (both vectors or both feature maps)"
        )
    if len(s) == 1:
        return nn.Linear(s[0], t[0])
    if len(s) == 2:
        layers: list[nn.Module] = [nn.Conv1d(s[0], t[0], kernel_size=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(t[0]))
    elif len(s) == 3:
        layers = [nn.Conv2d(s[0], t[0], kernel_size=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(t[0]))
    else:
        raise ShapeError(f"no adapter for features of rank {len(s)} (shapes {s} -> {t})")
    if s[1:] != t[1:]:
        layers.append(Resize(t[1:]))
    return nn.Sequential(*layers)
