"""CIFAR-style ResNets as in the CRD / RepDistiller codebase (He et al. 2016, option B shortcuts).

Three stages of BasicBlocks with ``n = (depth - 2) / 6`` blocks each; stage widths
``16, 32, 64`` after a 16-channel stem (``resnet8`` ... ``resnet110``), or ``64, 128, 256``
after a 32-channel stem for the 4x-wide ``resnet8x4`` / ``resnet32x4``; ``resnet_cifar`` takes
any blocks per stage and widths (the family shrunk students are built from). Module names match
RepDistiller's ``models/resnet.py``: ``conv1, bn1, relu, layer1, layer2, layer3, avgpool, fc``.

Differences from RepDistiller, none of which changes the parameters: no in-place ops (so a
captured feature is never overwritten), an adaptive average pool (any input size), any
number of input channels, and ``forward`` returns logits only (features come from hooks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from darkknowledge.errors import ConfigError
from darkknowledge.models._common import check_positive, image_channels
from darkknowledge.models._registry import register_model

_WIDTHS = (16, 16, 32, 64)
_WIDTHS_X4 = (32, 64, 128, 256)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection, ReLU after the sum.

    Module paths inside a block: ``conv1, bn1, relu, conv2, bn2, downsample`` (or no
    ``downsample``), ``relu_out``. ``"<block>.relu_out:input"`` is the pre-activation output
    (what RepDistiller calls ``preact``); the block's own output is post-ReLU.

    Args:
        inplanes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv (2 halves H and W).
        downsample: Shortcut projection when the shape changes, else None (identity).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, inplanes, H, W)`` -> ``(B, planes, H / stride, W / stride)``."""
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H', W')
        out = self.bn2(self.conv2(out))  # (B, planes, H', W')
        residual = x if self.downsample is None else self.downsample(x)  # (B, planes, H', W')
        return self.relu_out(out + residual)  # (B, planes, H', W')


class ResNetCifar(nn.Module):
    """A 3-stage CIFAR ResNet of BasicBlocks.

    Stage taps ``layer1, layer2, layer3`` (post-ReLU stage outputs; for 32x32 inputs they are
    32x32, 16x16 and 8x8); ``"fc:input"`` is the pooled penultimate feature ``(B, widths[3])``.

    Args:
        blocks: BasicBlocks in each of the three stages (``(n, n, n)`` for depth ``6n + 2``).
        widths: Stem width then the three stage widths.
        num_classes: Number of output logits.
        in_channels: Channels of the input image.
    """

    def __init__(
        self, blocks: Sequence[int], widths: Sequence[int], num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        if len(blocks) != 3 or any(n < 1 for n in blocks):
            raise ValueError(f"blocks must be three counts >= 1, got {list(blocks)}")
        if len(widths) != 4 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be four channel counts >= 1 (stem, stage 1-3), got {list(widths)}")
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(widths[1], blocks[0])
        self.layer2 = self._make_layer(widths[2], blocks[1], stride=2)
        self.layer3 = self._make_layer(widths[3], blocks[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        """One stage: ``blocks`` BasicBlocks, the first one with ``stride`` and a projection if needed."""
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            out_planes = planes * BasicBlock.expansion
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers.extend(BasicBlock(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def feature_taps(self) -> list[str]:
        """Stage outputs, shallow to deep: ``["layer1", "layer2", "layer3"]``."""
        return ["layer1", "layer2", "layer3"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` (or ``(B, H, W)``) images to ``(B, num_classes)`` logits."""
        if x.dim() == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        x = self.relu(self.bn1(self.conv1(x)))  # (B, w0, H, W)
        x = self.layer1(x)  # (B, w1, H, W)
        x = self.layer2(x)  # (B, w2, H/2, W/2)
        x = self.layer3(x)  # (B, w3, H/4, W/4)
        x = torch.flatten(self.avgpool(x), 1)  # (B, w3)
        return self.fc(x)  # (B, num_classes)


def build_resnet_cifar(
    name: str, depth: int, widths: Sequence[int], num_classes: int, input_shape: Sequence[int]
) -> ResNetCifar:
    """Check the framework-filled params and build a CIFAR ResNet.

    Args:
        name: Registered model name (for error messages).
        depth: ``6n + 2``.
        widths: Stem width then the three stage widths.
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)``.

    Raises:
        ConfigError: Bad ``num_classes``, ``input_shape`` or ``depth``.
    """
    where = f"model {name!r}"
    check_positive(where, num_classes=num_classes)
    in_channels = image_channels(where, input_shape)
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ConfigError(f"{where}.depth: depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    return ResNetCifar((n, n, n), widths, num_classes, in_channels)


NumClasses = Annotated[int, Field(ge=1)]


@register_model("resnet_cifar")
def resnet_cifar(
    num_classes: NumClasses = 10,
    input_shape: tuple[int, ...] = (3, 32, 32),
    blocks: tuple[int, int, int] = (3, 3, 3),
    widths: tuple[int, int, int, int] = _WIDTHS,
) -> ResNetCifar:
    """A CIFAR ResNet with any BasicBlocks per stage and widths (default: ``resnet20``).

    Args:
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)``.
        blocks: BasicBlocks in each of the three stages, each >= 1 (``resnet32``: 5, 5, 5).
        widths: Stem width then the three stage widths, each >= 1 (``resnet8x4``: 32, 64, 128, 256).

    Raises:
        ConfigError: Bad ``num_classes``, ``input_shape``, ``blocks`` or ``widths``.
    """
    where = "model 'resnet_cifar'"
    check_positive(where, num_classes=num_classes, blocks=blocks, widths=widths)
    return ResNetCifar(blocks, widths, num_classes, image_channels(where, input_shape))


@register_model("resnet8")
def resnet8(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> ResNetCifar:
    """ResNet-8 (1 block per stage, widths 16/16/32/64, ~0.08M params on CIFAR-100)."""
    return build_resnet_cifar("resnet8", 8, _WIDTHS, num_classes, input_shape)


@register_model("resnet14")
def resnet14(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> ResNetCifar:
    """ResNet-14 (2 blocks per stage, widths 16/16/32/64, ~0.18M params on CIFAR-100)."""
    return build_resnet_cifar("resnet14", 14, _WIDTHS, num_classes, input_shape)


@register_model("resnet20")
def resnet20(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> ResNetCifar:
    """ResNet-20 (3 blocks per stage, widths 16/16/32/64, ~0.28M params on CIFAR-100)."""
    return build_resnet_cifar("resnet20", 20, _WIDTHS, num_classes, input_shape)


@register_model("resnet32")
def resnet32(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> ResNetCifar:
    """ResNet-32 (5 blocks per stage, widths 16/16/32/64, ~0.47M params on CIFAR-100)."""
    return build_resnet_cifar("resnet32", 32, _WIDTHS, num_classes, input_shape)


@register_model("resnet44")
def resnet44(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> ResNetCifar:
    """ResNet-44 (7 blocks per stage, widths 16/16/32/64, ~0.67M params on CIFAR-100)."""
    return build_resnet_cifar("resnet44", 44, _WIDTHS, num_classes, input_shape)


@register_model("resnet56")
def resnet56(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> ResNetCifar:
    """ResNet-56 (9 blocks per stage, widths 16/16/32/64, ~0.86M params on CIFAR-100)."""
    return build_resnet_cifar("resnet56", 56, _WIDTHS, num_classes, input_shape)


@register_model("resnet110")
def resnet110(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> ResNetCifar:
    """ResNet-110 (18 blocks per stage, widths 16/16/32/64, ~1.74M params on CIFAR-100)."""
    return build_resnet_cifar("resnet110", 110, _WIDTHS, num_classes, input_shape)


@register_model("resnet8x4")
def resnet8x4(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> ResNetCifar:
    """ResNet-8x4 (1 block per stage, widths 32/64/128/256, ~1.23M params on CIFAR-100)."""
    return build_resnet_cifar("resnet8x4", 8, _WIDTHS_X4, num_classes, input_shape)


@register_model("resnet32x4")
def resnet32x4(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> ResNetCifar:
    """ResNet-32x4 (5 blocks per stage, widths 32/64/128/256, ~7.43M params on CIFAR-100)."""
    return build_resnet_cifar("resnet32x4", 32, _WIDTHS_X4, num_classes, input_shape)
