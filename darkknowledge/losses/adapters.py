"""Adapters that map a student feature onto a teacher feature's shape.

Built from the shapes a dry run probed, so nobody types channel counts:

* ``(D_s,) -> (D_t,)``: a linear layer.
* ``(C_s, L_s) -> (C_t, L_t)``: 1x1 ``Conv1d`` (+ BatchNorm), linear interpolation on length.
* ``(C_s, H_s, W_s) -> (C_t, H_t, W_t)``: 1x1 ``Conv2d`` + BatchNorm (the FitNets/CRD
  regressor form), bilinear resize when the spatial sizes differ.

Across ranks (cross-modal distillation, e.g. an image teacher and a sequence student), a
sequence and a feature map are adapted either way:

* ``(C_s, L_s) -> (C_t, H_t, W_t)`` (:class:`SequenceToMap`): 1x1 ``Conv1d`` (+ BatchNorm),
  linear interpolation of the length ``L_s -> H_t * W_t``, reshape to ``(C_t, H_t, W_t)``.
* ``(C_s, H_s, W_s) -> (C_t, L_t)`` (:class:`MapToSequence`): flatten the map to a sequence
  ``(C_s, H_s * W_s)``, 1x1 ``Conv1d`` (+ BatchNorm), linear interpolation to ``L_t``.

Both read a map's positions in **row-major order** as a sequence: position ``(h, w)`` is step
``h * W + w``. That correspondence is this module's choice, not a fact about the data: two
modalities have no natural spatial correspondence, so only the channel map (the 1x1
convolution) is learned and the positions are matched by their order. A vector ``(D,)`` is
not adapted to a sequence or a map (tap layers of the same kind).

Adapters belong to the loss that builds them and so to the trainable module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.errors import ShapeError

CROSS_RANK_PAIRS = frozenset({(2, 3), (3, 2)})
"""``(student rank, teacher rank)`` of per-sample shapes adapted across ranks: sequence <-> map."""


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


def _channel_map(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    """1x1 ``Conv1d`` ``C_in -> C_out`` (+ ``BatchNorm1d``; no conv bias then): ``(B, C_in, L) -> (B, C_out, L)``."""
    layers: list[nn.Module] = [nn.Conv1d(in_channels, out_channels, kernel_size=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(out_channels))
    return nn.Sequential(*layers)


def _check_rank(x: torch.Tensor, rank: int, what: str, owner: str) -> None:
    """Raise ``ShapeError`` unless ``x`` has ``rank`` dims (batch included)."""
    if x.dim() != rank:
        raise ShapeError(f"{owner}: expects {what}, got a tensor of shape {tuple(x.shape)}")


class SequenceToMap(nn.Module):
    """A student sequence ``(B, C_s, L_s)`` onto a teacher map ``(B, C_t, H_t, W_t)``.

    1x1 ``Conv1d`` ``C_s -> C_t`` (+ BatchNorm), linear interpolation of the length to
    ``H_t * W_t`` (skipped when equal), then a row-major reshape: step ``h * W_t + w`` becomes
    position ``(h, w)``. The order correspondence is the adapter's choice (the modalities have
    no natural spatial one); the convolution learns the channel map.

    Args:
        in_channels: ``C_s``.
        out_channels: ``C_t``.
        size: The teacher map's ``(H_t, W_t)``.
        batch_norm: Add ``BatchNorm1d`` after the 1x1 convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int], batch_norm: bool = True) -> None:
        super().__init__()
        self.proj = _channel_map(in_channels, out_channels, batch_norm)
        self.size = (int(size[0]), int(size[1]))
        self.resize = Resize((self.size[0] * self.size[1],))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_s, L_s) -> (B, C_t, H_t, W_t)
        _check_rank(x, 3, "a sequence (B, C, L)", "SequenceToMap")
        y = self.resize(self.proj(x))  # (B, C_t, L_s) -> (B, C_t, H_t * W_t)
        return y.reshape(y.shape[0], y.shape[1], *self.size)  # row-major: (B, C_t, H_t, W_t)


class MapToSequence(nn.Module):
    """A student map ``(B, C_s, H_s, W_s)`` onto a teacher sequence ``(B, C_t, L_t)``.

    Flattens the map row-major (position ``(h, w)`` becomes step ``h * W_s + w``), then 1x1
    ``Conv1d`` ``C_s -> C_t`` (+ BatchNorm) and linear interpolation of the length
    ``H_s * W_s -> L_t`` (skipped when equal). The order correspondence is the adapter's
    choice (the modalities have no natural spatial one); the convolution learns the channel map.

    Args:
        in_channels: ``C_s``.
        out_channels: ``C_t``.
        length: The teacher sequence's ``L_t``.
        batch_norm: Add ``BatchNorm1d`` after the 1x1 convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, length: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.proj = _channel_map(in_channels, out_channels, batch_norm)
        self.resize = Resize((int(length),))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_s, H_s, W_s) -> (B, C_t, L_t)
        _check_rank(x, 4, "a feature map (B, C, H, W)", "MapToSequence")
        seq = x.flatten(2)  # row-major: (B, C_s, H_s * W_s)
        return self.resize(self.proj(seq))  # (B, C_t, H_s * W_s) -> (B, C_t, L_t)


def build_adapter(
    student_shape: tuple[int, ...],
    teacher_shape: tuple[int, ...],
    batch_norm: bool = True,
    identity_if_equal: bool = True,
) -> nn.Module:
    """Return a module mapping a student feature ``(B, *student_shape)`` to ``(B, *teacher_shape)``.

    Same rank: Linear (vectors), 1x1 conv (+ BN) and resize (sequences, maps). Across ranks:
    :class:`SequenceToMap` for ``(C_s, L_s) -> (C_t, H_t, W_t)`` and :class:`MapToSequence`
    for ``(C_s, H_s, W_s) -> (C_t, L_t)`` (positions matched in row-major order).

    Args:
        student_shape: Per-sample student feature shape (no batch dim).
        teacher_shape: Per-sample teacher feature shape.
        batch_norm: Add BatchNorm after the 1x1 convolution.
        identity_if_equal: Return ``nn.Identity`` when the shapes already match.

    Raises:
        ShapeError: When the ranks differ other than sequence <-> map (e.g. a vector against a
            feature map), or for ranks above 3.
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s == t and identity_if_equal:
        return nn.Identity()
    if (len(s), len(t)) == (2, 3):
        return SequenceToMap(s[0], t[0], (t[1], t[2]), batch_norm=batch_norm)
    if (len(s), len(t)) == (3, 2):
        return MapToSequence(s[0], t[0], t[1], batch_norm=batch_norm)
    if len(s) != len(t):
        raise ShapeError(
            f"cannot adapt a student feature of shape {s} to a teacher feature of shape {t}: "
            "tap layers of the same kind (both vectors or both feature maps); across ranks only a "
            "sequence (C, L) and a feature map (C, H, W) are adapted, either way"
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
