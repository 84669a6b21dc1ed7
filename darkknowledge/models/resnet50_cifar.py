"""ResNet-50 for CIFAR as in the CRD / RepDistiller codebase (He et al. 2016, bottleneck blocks).

RepDistiller's ``ResNet50`` from ``models/resnetv2.py``: a 3x3 stride-1 conv-BN-ReLU stem of 64
channels (no max pool), four stages of 3, 4, 6, 3 bottleneck blocks (1x1 -> 3x3 -> 1x1 x4, BN
after each conv, ReLU after the sum) with 64, 128, 256, 512 bottleneck widths (outputs 256,
512, 1024, 2048), the 3x3 conv of the first block of stages 2-4 has stride 2 and a block whose
shape changes gets a 1x1 conv-BN projection shortcut; then global average pool and a linear
classifier. A 32x32 input leaves the last stage at 4x4.

Module names follow RepDistiller (``conv1, bn1, layer1`` ... ``layer4``, ``avgpool``; inside a
block ``conv1, bn1, conv2, bn2, conv3, bn3, shortcut``) with these differences, none of which
changes the parameters: the classifier is ``fc`` (RepDistiller: ``linear``); an identity
shortcut is ``None`` rather than an empty Sequential; the ReLUs are modules (``relu`` in the
stem; ``relu1, relu2, relu_out`` in a block, so ``"<block>.relu_out:input"`` is RepDistiller's
``preact``); no in-place ops; any number of input channels; and ``forward`` returns logits only
(features come from hooks).

``resnet_bottleneck_cifar`` builds the same layout with any bottlenecks per stage and
bottleneck widths (the stem has the first stage's width): the family shrunk students are
built from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from darkknowledge.models._common import check_positive, image_channels
from darkknowledge.models._registry import register_model

_PLANES = (64, 128, 256, 512)
_BLOCKS_50 = (3, 4, 6, 3)


class Bottleneck(nn.Module):
    """1x1 conv-BN-ReLU, 3x3 conv-BN-ReLU (with the stride), 1x1 conv-BN to ``4 * planes``, plus a shortcut.

    Args:
        in_planes: Input channels.
        planes: Bottleneck width (the block outputs ``4 * planes``).
        stride: Stride of the 3x3 conv.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_planes, H, W)`` -> ``(B, 4 * planes, H / stride, W / stride)``."""
        out = self.relu1(self.bn1(self.conv1(x)))  # (B, planes, H, W)
        out = self.relu2(self.bn2(self.conv2(out)))  # (B, planes, H', W')
        out = self.bn3(self.conv3(out))  # (B, 4 planes, H', W')
        residual = x if self.shortcut is None else self.shortcut(x)  # (B, 4 planes, H', W')
        return self.relu_out(out + residual)  # (B, 4 planes, H', W')


class ResNetBottleneckCifar(nn.Module):
    """A four-stage bottleneck ResNet with a CIFAR stem.

    Stage taps ``layer1`` ... ``layer4`` (post-ReLU stage outputs, 256/512/1024/2048 channels;
    for 32x32 inputs at 32x32, 16x16, 8x8, 4x4); ``"fc:input"`` is the pooled feature
    ``(B, 2048)``.

    Args:
        blocks: Number of bottlenecks in each of the four stages.
        num_classes: Number of output logits.
        in_channels: Channels of the input image.
        planes: Bottleneck widths of the four stages (outputs ``4 *`` these); the stem has
            ``planes[0]`` channels.
    """

    def __init__(
        self, blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3, planes: Sequence[int] = _PLANES
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or any(n < 1 for n in blocks):
            raise ValueError(f"blocks must be four counts >= 1, got {list(blocks)}")
        if len(planes) != 4 or any(p < 1 for p in planes):
            raise ValueError(f"planes must be four channel counts >= 1, got {list(planes)}")
        self.in_planes = planes[0]
        self.conv1 = nn.Conv2d(in_channels, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(planes[0], blocks[0], stride=1)
        self.layer2 = self._make_layer(planes[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(planes[2], blocks[2], stride=2)
        self.layer4 = self._make_layer(planes[3], blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[3] * Bottleneck.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """One stage: ``blocks`` bottlenecks, the first with ``stride``."""
        layers = [Bottleneck(self.in_planes, planes, stride)]
        self.in_planes = planes * Bottleneck.expansion
        layers.extend(Bottleneck(self.in_planes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def feature_taps(self) -> list[str]:
        """Stage outputs, shallow to deep: ``["layer1", "layer2", "layer3", "layer4"]``."""
        return ["layer1", "layer2", "layer3", "layer4"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` (or ``(B, H, W)``) images to ``(B, num_classes)`` logits."""
        if x.dim() == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 64, H, W)
        x = self.layer1(x)  # (B, 256, H, W)
        x = self.layer2(x)  # (B, 512, H/2, W/2)
        x = self.layer3(x)  # (B, 1024, H/4, W/4)
        x = self.layer4(x)  # (B, 2048, H/8, W/8)
        x = torch.flatten(self.avgpool(x), 1)  # (B, 2048)
        return self.fc(x)  # (B, num_classes)


NumClasses = Annotated[int, Field(ge=1)]


@register_model("resnet50_cifar")
def resnet50_cifar(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> ResNetBottleneckCifar:
    """ResNet-50 with a CIFAR stem (RepDistiller's ``ResNet50``, ~23.71M params on CIFAR-100).

    Raises:
        ConfigError: Bad ``num_classes`` or ``input_shape``.
    """
    where = "model 'resnet50_cifar'"
    check_positive(where, num_classes=num_classes)
    return ResNetBottleneckCifar(_BLOCKS_50, num_classes, image_channels(where, input_shape))


@register_model("resnet_bottleneck_cifar")
def resnet_bottleneck_cifar(
    num_classes: NumClasses = 10,
    input_shape: tuple[int, ...] = (3, 32, 32),
    blocks: tuple[int, int, int, int] = _BLOCKS_50,
    planes: tuple[int, int, int, int] = _PLANES,
) -> ResNetBottleneckCifar:
    """A bottleneck ResNet with the CIFAR stem, any blocks and widths (default: ``resnet50_cifar``).

    Args:
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)``.
        blocks: Bottlenecks in each of the four stages, each >= 1.
        planes: Bottleneck widths of the four stages, each >= 1 (stage outputs are 4x these).

    Raises:
        ConfigError: Bad ``num_classes``, ``input_shape``, ``blocks`` or ``planes``.
    """
    where = "model 'resnet_bottleneck_cifar'"
    check_positive(where, num_classes=num_classes, blocks=blocks, planes=planes)
    return ResNetBottleneckCifar(blocks, num_classes, image_channels(where, input_shape), planes)
