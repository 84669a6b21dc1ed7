"""Wide ResNets WRN-d-w (Zagoruyko & Komodakis 2016) as in the CRD / RepDistiller codebase.

Pre-activation BasicBlocks, ``n = (depth - 4) / 6`` blocks in each of three stages with widths
``16w, 32w, 64w`` after a 16-channel stem conv. Module names follow RepDistiller's
``models/wrn.py``: ``conv1, block1, block2, block3`` (each holding its blocks in ``.layer``),
``bn1, relu, fc``, plus ``avgpool``. No in-place ops, an adaptive average pool (any input size)
and any number of input channels; ``forward`` returns logits only.

``wide_resnet`` builds the same layout with any blocks per stage and any stem and stage widths:
the family shrunk students are built from (``wrn_40_2`` is ``blocks=(6, 6, 6)``,
``widths=(16, 32, 64, 128)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from darkknowledge.errors import ConfigError
from darkknowledge.models._common import (
    check_dropout,
    check_positive,
    fan_out_init,
    image_channels,
)
from darkknowledge.models._registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus a shortcut.

    When the input and output widths differ, the first BN-ReLU is shared by the residual
    branch and the 1x1 projection ``shortcut`` (as in the original code); otherwise the
    shortcut is the identity on the raw input.

    Args:
        in_planes: Input channels.
        out_planes: Output channels.
        stride: Stride of the first conv.
        dropout: Dropout probability between the two convs.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.shortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_planes, H, W)`` -> ``(B, out_planes, H / stride, W / stride)``."""
        act = self.relu1(self.bn1(x))  # (B, in, H, W)
        out = self.relu2(self.bn2(self.conv1(act)))  # (B, out, H', W')
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.conv2(out)  # (B, out, H', W')
        residual = x if self.shortcut is None else self.shortcut(act)  # (B, out, H', W')
        return out + residual


class NetworkBlock(nn.Module):
    """One stage: ``nb_layers`` WideBasicBlocks in ``self.layer`` (the first with ``stride``).

    Args:
        nb_layers: Number of blocks.
        in_planes: Input channels of the first block.
        out_planes: Output channels of every block.
        stride: Stride of the first block.
        dropout: Dropout inside every block.
    """

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        blocks = [WideBasicBlock(in_planes, out_planes, stride, dropout)]
        blocks.extend(WideBasicBlock(out_planes, out_planes, 1, dropout) for _ in range(1, nb_layers))
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_planes, H, W)`` -> ``(B, out_planes, H / stride, W / stride)``."""
        return self.layer(x)


def wrn_layout(depth: int, widen: int) -> tuple[tuple[int, int, int], tuple[int, int, int, int]]:
    """Blocks per stage and ``(stem, stage 1-3)`` widths of WRN-depth-widen.

    Raises:
        ValueError: ``depth`` is not ``6n + 4`` with ``n >= 1``.
    """
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    n = (depth - 4) // 6
    return (n, n, n), (16, 16 * widen, 32 * widen, 64 * widen)


class WideResNet(nn.Module):
    """A Wide ResNet for small images (WRN-depth-widen, or any blocks and widths).

    Stage taps ``block1, block2, block3`` (stage outputs before the next pre-activation
    BN-ReLU; RepDistiller's ``f1, f2, f3``); ``"fc:input"`` is the pooled penultimate feature
    ``(B, widths[3])`` (``64 * widen``).

    Args:
        blocks: Blocks in each of the three stages (``(n, n, n)`` for depth ``6n + 4``).
        widths: Stem width then the three stage widths (``16, 16w, 32w, 64w``).
        num_classes: Number of output logits.
        dropout: Dropout inside every block.
        in_channels: Channels of the input image.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(blocks) != 3 or any(n < 1 for n in blocks):
            raise ValueError(f"blocks must be three counts >= 1, got {list(blocks)}")
        if len(widths) != 4 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be four channel counts >= 1 (stem, stage 1-3), got {list(widths)}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks[0], widths[0], widths[1], 1, dropout)
        self.block2 = NetworkBlock(blocks[1], widths[1], widths[2], 2, dropout)
        self.block3 = NetworkBlock(blocks[2], widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]

        fan_out_init(self)

    def feature_taps(self) -> list[str]:
        """Stage outputs, shallow to deep: ``["block1", "block2", "block3"]``."""
        return ["block1", "block2", "block3"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` (or ``(B, H, W)``) images to ``(B, num_classes)`` logits."""
        if x.dim() == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        out = self.conv1(x)  # (B, 16, H, W)
        out = self.block1(out)  # (B, 16w, H, W)
        out = self.block2(out)  # (B, 32w, H/2, W/2)
        out = self.block3(out)  # (B, 64w, H/4, W/4)
        out = self.relu(self.bn1(out))  # (B, 64w, H/4, W/4)
        out = torch.flatten(self.avgpool(out), 1)  # (B, 64w)
        return self.fc(out)  # (B, num_classes)


def build_wrn(
    name: str, depth: int, widen: int, dropout: float, num_classes: int, input_shape: Sequence[int]
) -> WideResNet:
    """Check the params and build a Wide ResNet.

    Raises:
        ConfigError: Bad ``depth``, ``widen``, ``dropout``, ``num_classes`` or ``input_shape``.
    """
    where = f"model {name!r}"
    check_positive(where, num_classes=num_classes, widen=widen)
    check_dropout(where, dropout)
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ConfigError(
            f"{where}.depth: a Wide ResNet needs depth = 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}"
        )
    blocks, widths = wrn_layout(depth, widen)
    return WideResNet(blocks, widths, num_classes, dropout, image_channels(where, input_shape))


NumClasses = Annotated[int, Field(ge=1)]
Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]


@register_model("wrn")
def wrn(
    num_classes: NumClasses = 10,
    input_shape: tuple[int, ...] = (3, 32, 32),
    depth: int = 16,
    widen: Annotated[int, Field(ge=1)] = 2,
    dropout: Dropout = 0.0,
) -> WideResNet:
    """Wide ResNet WRN-depth-widen.

    Args:
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)``.
        depth: ``6n + 4`` (10, 16, 22, 28, 40, ...).
        widen: Width multiplier.
        dropout: Dropout between the two convs of every block.
    """
    return build_wrn("wrn", depth, widen, dropout, num_classes, input_shape)


@register_model("wide_resnet")
def wide_resnet(
    num_classes: NumClasses = 10,
    input_shape: tuple[int, ...] = (3, 32, 32),
    blocks: tuple[int, int, int] = (2, 2, 2),
    widths: tuple[int, int, int, int] = (16, 32, 64, 128),
    dropout: Dropout = 0.0,
) -> WideResNet:
    """A Wide ResNet with any blocks per stage and widths (default: ``wrn_16_2``).

    Args:
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)``.
        blocks: Pre-activation blocks in each of the three stages, each >= 1.
        widths: Stem width then the three stage widths, each >= 1.
        dropout: Dropout between the two convs of every block.

    Raises:
        ConfigError: Bad ``num_classes``, ``input_shape``, ``blocks``, ``widths`` or ``dropout``.
    """
    where = "model 'wide_resnet'"
    check_positive(where, num_classes=num_classes, blocks=blocks, widths=widths)
    check_dropout(where, dropout)
    return WideResNet(blocks, widths, num_classes, dropout, image_channels(where, input_shape))


@register_model("wrn_16_1")
def wrn_16_1(
    num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32), dropout: Dropout = 0.0
) -> WideResNet:
    """WRN-16-1 (~0.18M params on CIFAR-100)."""
    return build_wrn("wrn_16_1", 16, 1, dropout, num_classes, input_shape)


@register_model("wrn_16_2")
def wrn_16_2(
    num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32), dropout: Dropout = 0.0
) -> WideResNet:
    """WRN-16-2 (~0.70M params on CIFAR-100)."""
    return build_wrn("wrn_16_2", 16, 2, dropout, num_classes, input_shape)


@register_model("wrn_40_1")
def wrn_40_1(
    num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32), dropout: Dropout = 0.0
) -> WideResNet:
    """WRN-40-1 (~0.57M params on CIFAR-100)."""
    return build_wrn("wrn_40_1", 40, 1, dropout, num_classes, input_shape)


@register_model("wrn_40_2")
def wrn_40_2(
    num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32), dropout: Dropout = 0.0
) -> WideResNet:
    """WRN-40-2 (~2.26M params on CIFAR-100)."""
    return build_wrn("wrn_40_2", 40, 2, dropout, num_classes, input_shape)


@register_model("wrn_28_10")
def wrn_28_10(
    num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32), dropout: Dropout = 0.0
) -> WideResNet:
    """WRN-28-10 (~36.5M params on CIFAR-100)."""
    return build_wrn("wrn_28_10", 28, 10, dropout, num_classes, input_shape)
