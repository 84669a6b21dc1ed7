"""ShuffleNetV1 and ShuffleNetV2 for CIFAR as in the CRD / RepDistiller codebase.

Both start with a 1x1 conv-BN-ReLU stem of 24 channels at full resolution, then three stages
whose first block halves H and W (a 32x32 input leaves them at 4x4), then global average pool
and a linear classifier.

* ``shufflenetv1`` (Zhang et al. 2018; RepDistiller's ``ShuffleV1``, 3 groups): stages of 4,
  8, 4 bottlenecks at 240, 480, 960 channels. A bottleneck is a grouped 1x1 conv to a quarter
  of its output width, a channel shuffle, a 3x3 depthwise conv and a grouped 1x1 conv, each
  with BN (ReLU after the first); the shortcut is the identity (summed) or, in a stage's first
  block, a 3x3 stride-2 average pool whose output is concatenated; ReLU after the merge. The
  very first 1x1 conv is not grouped (24 input channels).
* ``shufflenetv2`` (Ma et al. 2018; RepDistiller's ``ShuffleV2``, ``net_size`` 1): stages of
  one down-sampling block and 3, 7, 3 basic blocks at 116, 232, 464 channels, then a 1x1
  conv-BN-ReLU to 1024 channels. A basic block splits the channels in halves, passes one
  half through 1x1 conv-BN-ReLU, 3x3 depthwise conv-BN, 1x1 conv-BN-ReLU, concatenates the
  untouched half in front and shuffles with 2 groups; a down-sampling block concatenates two
  stride-2 branches (depthwise-BN, 1x1-BN-ReLU | 1x1-BN-ReLU, depthwise-BN, 1x1-BN-ReLU).

Module names follow RepDistiller's ``models/ShuffleNetv1.py`` / ``ShuffleNetv2.py``
(``conv1, bn1, layer1, layer2, layer3`` [``conv2, bn2``], inside blocks ``conv1, bn1, ...``)
with these differences, none of which changes the parameters: the classifier is ``fc``
(RepDistiller: ``linear``) after an adaptive ``avgpool`` (any input size, where RepDistiller
pools a fixed 4x4); the ReLUs and shuffles are modules (V1 blocks: ``relu1, relu2, shuffle1,
relu_out``, so ``"<block>.relu_out:input"`` is the pre-activation; V2 blocks: ``relu1,
relu3, shuffle``, down-sampling blocks ``relu2, relu3, relu5, shuffle``); no in-place ops; any
number of input channels; and ``forward`` returns
logits only (features come from hooks).

Both builders take the stem width, stage widths and blocks per stage (V2 also the head width):
shrunk students keep the three stages. ShuffleNetV1's grouped 1x1 convs and its quarter-width
bottlenecks need every stage width and every stage's growth over the previous one (the stem
first) to be a multiple of ``4 * groups = 12``; ShuffleNetV2's split and two branches need even
stage widths.
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

_STEM = 24
_V1_WIDTHS, _V1_BLOCKS, _V1_GROUPS = (240, 480, 960), (4, 8, 4), 3
_V2_WIDTHS, _V2_BLOCKS, _V2_LAST = (116, 232, 464), (3, 7, 3), 1024
V1_CHANNEL_STEP = 4 * _V1_GROUPS
"""ShuffleNetV1 widths (and each stage's growth) are multiples of this: a quarter-width
bottleneck of a multiple of the group count."""


class ChannelShuffle(nn.Module):
    """Interleave ``groups`` channel groups: ``(B, g * n, H, W)`` -> channel ``i * g + j`` <- ``j * n + i``.

    Args:
        groups: Number of groups (1 is the identity).
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)`` with the channels shuffled."""
        b, c, h, w = x.shape
        x = x.view(b, self.groups, c // self.groups, h, w)  # (B, g, C/g, H, W)
        return x.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)


class ShuffleV1Block(nn.Module):
    """ShuffleNetV1 bottleneck (see the module docstring).

    Args:
        in_planes: Input channels.
        out_planes: Channels of the residual branch (in a stride-2 block the input is
            concatenated, so the block outputs ``in_planes + out_planes``).
        stride: 1 (sum with the input) or 2 (concatenate with the pooled input).
        groups: Groups of the 1x1 convs.
        group_first: Group the first 1x1 conv (False only for the network's first block).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, group_first: bool = True) -> None:
        super().__init__()
        mid = out_planes // 4
        first_groups = groups if group_first else 1
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in, H, W)`` -> ``(B, out, H, W)`` or, stride 2, ``(B, in + out, H/2, W/2)``."""
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))  # (B, mid, H, W)
        out = self.relu2(self.bn2(self.conv2(out)))  # (B, mid, H', W')
        out = self.bn3(self.conv3(out))  # (B, out, H', W')
        if self.shortcut is None:
            return self.relu_out(out + x)  # (B, out, H, W)
        return self.relu_out(torch.cat([out, self.shortcut(x)], 1))  # (B, out + in, H/2, W/2)


class ShuffleNetV1Cifar(nn.Module):
    """ShuffleNetV1 (3 groups) for small images.

    Stage taps ``layer1, layer2, layer3`` (post-ReLU stage outputs, 240/480/960 channels; for
    32x32 inputs at 16x16, 8x8, 4x4); ``"fc:input"`` is the pooled feature ``(B, 960)``.

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input image.
        widths: Output channels of the three stages.
        blocks: Bottlenecks per stage (the first one down-samples).
        stem: Channels of the 1x1 stem conv.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = _V1_WIDTHS,
        blocks: Sequence[int] = _V1_BLOCKS,
        stem: int = _STEM,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.in_planes = stem
        self.layer1 = self._make_layer(widths[0], blocks[0], group_first=False)
        self.layer2 = self._make_layer(widths[1], blocks[1])
        self.layer3 = self._make_layer(widths[2], blocks[2])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def _make_layer(self, out_planes: int, blocks: int, group_first: bool = True) -> nn.Sequential:
        """A stride-2 block that concatenates its input, then ``blocks - 1`` residual blocks."""
        layers = [ShuffleV1Block(self.in_planes, out_planes - self.in_planes, 2, _V1_GROUPS, group_first)]
        layers.extend(ShuffleV1Block(out_planes, out_planes, 1, _V1_GROUPS) for _ in range(1, blocks))
        self.in_planes = out_planes
        return nn.Sequential(*layers)

    def feature_taps(self) -> list[str]:
        """Stage outputs, shallow to deep: ``["layer1", "layer2", "layer3"]``."""
        return ["layer1", "layer2", "layer3"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` (or ``(B, H, W)``) images to ``(B, num_classes)`` logits."""
        if x.dim() == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        x = self.relu(self.bn1(self.conv1(x)))  # (B, stem, H, W); stem 24, widths 240/480/960 by default
        x = self.layer1(x)  # (B, w0, H/2, W/2)
        x = self.layer2(x)  # (B, w1, H/4, W/4)
        x = self.layer3(x)  # (B, w2, H/8, W/8)
        x = torch.flatten(self.avgpool(x), 1)  # (B, w2)
        return self.fc(x)  # (B, num_classes)


class ShuffleV2Block(nn.Module):
    """ShuffleNetV2 basic block: split, one half through the branch, concat, shuffle.

    Args:
        channels: Input and output channels (even).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.split = channels // 2
        half = channels - self.split
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu3 = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        kept, x2 = x[:, : self.split], x[:, self.split :]  # (B, C/2, H, W) each
        out = self.relu1(self.bn1(self.conv1(x2)))  # (B, C/2, H, W)
        out = self.bn2(self.conv2(out))  # (B, C/2, H, W)
        out = self.relu3(self.bn3(self.conv3(out)))  # (B, C/2, H, W)
        return self.shuffle(torch.cat([kept, out], 1))  # (B, C, H, W)


class ShuffleV2DownBlock(nn.Module):
    """ShuffleNetV2 down-sampling block: two stride-2 branches of ``out/2`` channels, concat, shuffle.

    Args:
        in_channels: Input channels.
        out_channels: Output channels (even).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in, H, W)`` -> ``(B, out, H/2, W/2)``."""
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))  # (B, out/2, H/2, W/2)
        right = self.relu3(self.bn3(self.conv3(x)))  # (B, out/2, H, W)
        right = self.bn4(self.conv4(right))  # (B, out/2, H/2, W/2)
        right = self.relu5(self.bn5(self.conv5(right)))  # (B, out/2, H/2, W/2)
        return self.shuffle(torch.cat([left, right], 1))  # (B, out, H/2, W/2)


class ShuffleNetV2Cifar(nn.Module):
    """ShuffleNetV2 (``net_size`` 1) for small images.

    Stage taps ``layer1, layer2, layer3`` (stage outputs, 116/232/464 channels; for 32x32
    inputs at 16x16, 8x8, 4x4); ``"fc:input"`` is the pooled feature ``(B, 1024)``.

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input image.
        widths: Output channels of the three stages (even).
        blocks: Basic blocks per stage after its down-sampling block (>= 0).
        stem: Channels of the 1x1 stem conv.
        last: Channels of the 1x1 conv before the pool.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = _V2_WIDTHS,
        blocks: Sequence[int] = _V2_BLOCKS,
        stem: int = _STEM,
        last: int = _V2_LAST,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        widths = (stem, *widths)
        self.layer1 = self._make_layer(widths[0], widths[1], blocks[0])
        self.layer2 = self._make_layer(widths[1], widths[2], blocks[1])
        self.layer3 = self._make_layer(widths[2], widths[3], blocks[2])
        self.conv2 = nn.Conv2d(widths[3], last, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    @staticmethod
    def _make_layer(in_channels: int, out_channels: int, blocks: int) -> nn.Sequential:
        """A down-sampling block, then ``blocks`` basic blocks."""
        layers: list[nn.Module] = [ShuffleV2DownBlock(in_channels, out_channels)]
        layers.extend(ShuffleV2Block(out_channels) for _ in range(blocks))
        return nn.Sequential(*layers)

    def feature_taps(self) -> list[str]:
        """Stage outputs, shallow to deep: ``["layer1", "layer2", "layer3"]``."""
        return ["layer1", "layer2", "layer3"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` (or ``(B, H, W)``) images to ``(B, num_classes)`` logits."""
        if x.dim() == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        x = self.relu(self.bn1(self.conv1(x)))  # (B, stem, H, W); stem 24, widths 116/232/464 by default
        x = self.layer1(x)  # (B, w0, H/2, W/2)
        x = self.layer2(x)  # (B, w1, H/4, W/4)
        x = self.layer3(x)  # (B, w2, H/8, W/8)
        x = self.relu2(self.bn2(self.conv2(x)))  # (B, last, H/8, W/8); last 1024 by default
        x = torch.flatten(self.avgpool(x), 1)  # (B, last)
        return self.fc(x)  # (B, num_classes)


def _checked_channels(name: str, num_classes: int, input_shape: Sequence[int]) -> int:
    """Check the framework-filled params; return the input channel count.

    Raises:
        ConfigError: Bad ``num_classes`` or ``input_shape``.
    """
    where = f"model {name!r}"
    check_positive(where, num_classes=num_classes)
    return image_channels(where, input_shape)


def check_v1_widths(where: str, stem: int, widths: Sequence[int]) -> None:
    """Raise ``ConfigError`` unless the stem, every stage width and every stage's growth over the
    previous width are positive multiples of :data:`V1_CHANNEL_STEP` (12)."""
    step = V1_CHANNEL_STEP
    if stem % step:
        raise ConfigError(
            f"{where}.stem_channels: must be a positive multiple of {step} (4 x {_V1_GROUPS} groups), got {stem}"
        )
    previous = stem
    for i, width in enumerate(widths):
        if width % step or width <= previous:
            raise ConfigError(
                f"{where}.widths: stage {i + 1} has {width} channels; ShuffleNetV1 needs a multiple of {step} "
                f"(4 x {_V1_GROUPS} groups) above the previous width {previous} (widths {list(widths)}, "
                f"stem {stem})"
            )
        previous = width


NumClasses = Annotated[int, Field(ge=1)]
Positive = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]


@register_model("shufflenetv1")
def shufflenetv1(
    num_classes: NumClasses = 10,
    input_shape: tuple[int, ...] = (3, 32, 32),
    widths: tuple[Positive, Positive, Positive] = _V1_WIDTHS,
    blocks: tuple[Positive, Positive, Positive] = _V1_BLOCKS,
    stem_channels: Positive = _STEM,
) -> ShuffleNetV1Cifar:
    """ShuffleNetV1, 3 groups (RepDistiller's ``ShuffleV1``, ~0.95M params on CIFAR-100).

    Args:
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)``.
        widths: Output channels of the three stages: multiples of 12, each above the previous
            one (the stem first).
        blocks: Bottlenecks per stage, each >= 1 (the first down-samples and concatenates).
        stem_channels: Channels of the 1x1 stem conv (a multiple of 12).

    Raises:
        ConfigError: Bad ``num_classes``, ``input_shape``, or widths that break the groups.
    """
    in_channels = _checked_channels("shufflenetv1", num_classes, input_shape)
    check_v1_widths("model 'shufflenetv1'", stem_channels, widths)
    return ShuffleNetV1Cifar(num_classes, in_channels, widths, blocks, stem_channels)


@register_model("shufflenetv2")
def shufflenetv2(
    num_classes: NumClasses = 10,
    input_shape: tuple[int, ...] = (3, 32, 32),
    widths: tuple[Positive, Positive, Positive] = _V2_WIDTHS,
    blocks: tuple[Count, Count, Count] = _V2_BLOCKS,
    stem_channels: Positive = _STEM,
    last_channels: Positive = _V2_LAST,
) -> ShuffleNetV2Cifar:
    """ShuffleNetV2, ``net_size`` 1 (RepDistiller's ``ShuffleV2``, ~1.36M params on CIFAR-100).

    Args:
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)``.
        widths: Output channels of the three stages, each even (RepDistiller's ``net_size``
            0.5: 48, 96, 192).
        blocks: Basic blocks per stage after its down-sampling block, each >= 0.
        stem_channels: Channels of the 1x1 stem conv.
        last_channels: Channels of the 1x1 conv before the pool (``net_size`` 2: 2048).

    Raises:
        ConfigError: Bad ``num_classes``, ``input_shape`` or an odd stage width.
    """
    in_channels = _checked_channels("shufflenetv2", num_classes, input_shape)
    odd = [w for w in widths if w % 2]
    if odd:
        raise ConfigError(
            f"model 'shufflenetv2'.widths: ShuffleNetV2 splits every stage in two halves, so "
            f"each width must be even, got {list(widths)}"
        )
    return ShuffleNetV2Cifar(num_classes, in_channels, widths, blocks, stem_channels, last_channels)
