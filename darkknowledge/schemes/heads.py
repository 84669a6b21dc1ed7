"""Auxiliary classifier heads attached to intermediate stages of a network (early exits).

A head maps the feature of one stage ``(B, C, *S)`` (or ``(B, D)``) to a feature of the same
size as the network's penultimate feature ``(B, D)`` with a small *bottleneck*, then to logits
with its own linear classifier. Used by self-distillation schemes (BYOT) whose shallow heads
learn from the network's deepest classifier.

Heads hold no BatchNorm on purpose: a step then does not depend on how a batch is split
across DDP ranks (two processes give the same weights as one).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.taps import FeatureTaps

BottleneckKind = Literal["conv", "mlp"]
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


class Reduce(nn.Module):
    """Map a stage-shaped map ``(B, C, *S)`` to the penultimate feature ``(B, D)``.

    ``flatten`` when ``D = C * prod(S)`` (e.g. ``cnn1d``), global average pooling when ``D = C``
    (e.g. ResNets).
    """

    def __init__(self, mode: Literal["flatten", "pool"]) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "pool":
            return x.flatten(2).mean(-1)  # (B, C)
        return x.flatten(1)  # (B, C * prod(S))


def _reduce_mode(map_shape: tuple[int, ...], dim: int) -> Literal["flatten", "pool"] | None:
    if math.prod(map_shape) == dim:
        return "flatten"
    if map_shape[0] == dim:
        return "pool"
    return None


def conv_bottleneck(in_shape: tuple[int, ...], map_shape: tuple[int, ...], dim: int, width: int) -> nn.Sequential:
    """Conv bottleneck from a stage map to the deepest stage's map, then reduced to ``(B, dim)``.

    1x1 conv to ``width`` channels, stride-2 3x3 convs while every spatial size is at least twice
    the target's, adaptive average pooling to the exact target size when needed, 1x1 conv to the
    deepest stage's channels; ReLU after every conv (the deepest features are post-ReLU).

    Args:
        in_shape: Per-sample shape of the stage's feature ``(C, *S)``.
        map_shape: Per-sample shape of the deepest stage's map ``(C_L, *S_L)``.
        dim: Size of the penultimate feature ``D`` (``fc``'s input).
        width: Channels inside the bottleneck.
    """
    spatial = len(in_shape) - 1
    if spatial not in _CONV or len(map_shape) != len(in_shape):
        raise ShapeError(
            f"conv bottleneck: stage feature {in_shape} and deepest stage map {map_shape} must both be "
            "(C, L), (C, H, W) or (C, D, H, W) maps; use bottleneck: mlp"
        )
    mode = _reduce_mode(map_shape, dim)
    if mode is None:
        raise ShapeError(
            f"conv bottleneck: the deepest stage map {map_shape} neither flattens nor pools to the "
            f"penultimate feature of size {dim}; use bottleneck: mlp"
        )
    conv, target = _CONV[spatial], list(map_shape[1:])
    layers: list[nn.Module] = [conv(in_shape[0], width, 1), nn.ReLU()]
    size = list(in_shape[1:])
    while all(s >= 2 * t for s, t in zip(size, target)):
        layers += [conv(width, width, 3, stride=2, padding=1), nn.ReLU()]
        size = [(s - 1) // 2 + 1 for s in size]
    if size != target:
        layers.append(_POOL[spatial](tuple(target)))
    layers += [conv(width, map_shape[0], 1), nn.ReLU(), Reduce(mode)]
    return nn.Sequential(*layers)


def mlp_bottleneck(in_shape: tuple[int, ...], dim: int, width: int) -> nn.Sequential:
    """Flatten, ``Linear(prod(in_shape), width)``, ReLU, ``Linear(width, dim)``, ReLU."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(in_shape), width), nn.ReLU(), nn.Linear(width, dim), nn.ReLU()
    )


class AuxHead(nn.Module):
    """Bottleneck to the penultimate feature size, then a linear classifier.

    ``forward(h)`` maps a stage feature ``(B, C, *S)`` to ``(feature (B, D), logits (B, K))``.
    """

    def __init__(self, bottleneck: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.bottleneck(h)  # (B, D)
        return feat, self.fc(feat)  # (B, D), (B, K)


def make_head(
    kind: BottleneckKind,
    in_shape: tuple[int, ...],
    map_shape: tuple[int, ...] | None,
    dim: int,
    num_classes: int,
    width: int | None = None,
    where: str = "head",
) -> AuxHead:
    """One auxiliary head for a stage of per-sample shape ``in_shape``.

    Args:
        kind: ``conv`` (maps; flat features fall back to ``mlp``) or ``mlp``.
        in_shape: The stage feature's per-sample shape.
        map_shape: The deepest stage map's per-sample shape (None: unknown; ``conv`` then fails).
        dim: Penultimate feature size ``D``.
        num_classes: Logits ``K``.
        width: Bottleneck width (default: the deepest stage's channels for ``conv``, ``D`` for ``mlp``).
        where: Name used in error messages.
    """
    if kind not in ("conv", "mlp"):
        raise ConfigError(f"{where}: unknown bottleneck {kind!r}; valid: 'conv', 'mlp'")
    if kind == "conv" and len(in_shape) > 1:
        if map_shape is None:
            raise ShapeError(
                f"{where}: the conv bottleneck needs the model's deepest stage (feature_taps()); "
                "this model has none: use bottleneck: mlp"
            )
        try:
            body = conv_bottleneck(in_shape, map_shape, dim, width or map_shape[0])
        except ShapeError as exc:
            raise ShapeError(f"{where}: {exc}") from None
    else:
        body = mlp_bottleneck(in_shape, dim, width or dim)
    return AuxHead(body, dim, num_classes)


class HeadView(nn.Module):
    """Evaluation-only view: the network up to a stage, then one auxiliary head (an early exit).

    It runs the whole network (the tap records the stage) and returns the head's logits. Keep
    it outside the trainable module: its parameters belong to the network and the head.

    Args:
        net: The backbone.
        stage: Module path of the stage the head reads.
        head: The head.
    """

    def __init__(self, net: nn.Module, stage: str, head: AuxHead) -> None:
        super().__init__()
        self.net, self.stage, self.head = net, stage, head
        self.taps = FeatureTaps(net, [stage])
        self.taps.active = False
        name = getattr(net, "dk_name", type(net).__name__)
        self.dk_name = f"{name}@{stage}"  # report label only (not a rebuildable zoo spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.taps.active = True
        try:
            self.net(x)
        finally:
            self.taps.active = False
        return self.head(self.taps.pop()[self.stage])[1]  # (B, K)
