"""MobileNetV2 for CIFAR as in the CRD / RepDistiller codebase (Sandler et al. 2018).

RepDistiller's ``mobile_half`` (its ``MobileNetV2`` entry): expansion ratio ``T = 6`` and width
multiplier 0.5. A stride-2 3x3 conv-BN-ReLU stem of ``int(32 w)`` channels, then seven groups
of inverted-residual blocks ``(t, c, n, s)``: ``(1, 16, 1, 1), (T, 24, 2, 1), (T, 32, 3, 2),
(T, 64, 4, 2), (T, 96, 3, 1), (T, 160, 3, 2), (T, 320, 1, 1)`` with ``int(c w)`` channels, a
1x1 conv-BN-ReLU to 1280 channels (``int(1280 w)`` when ``w > 1``), global average pool and a
linear classifier. A 32x32 input leaves the blocks at 2x2 (16x downsampling). ``blocks`` sets
the ``n`` of each group (default ``1, 2, 3, 4, 3, 3, 1``): shrunk students keep the seven groups.

As in RepDistiller (and unlike torchvision's MobileNetV2) every inverted-residual block has
the 1x1 expansion conv, also when ``t = 1``. Module names follow RepDistiller's
``models/mobilenetv2.py`` (``conv1``, ``blocks``, each block's ``conv`` Sequential, ``conv2``)
with these differences, none of which changes the parameters: the classifier is ``fc``
(RepDistiller: ``classifier.0``) after an adaptive ``avgpool`` (any input size, where
RepDistiller needs a multiple of 32); no in-place ops; any number of input channels; and
``forward`` returns logits only (features come from hooks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from darkknowledge.errors import ConfigError
from darkknowledge.models._common import check_positive, fan_out_init, image_channels
from darkknowledge.models._registry import register_model

_STEM = 32
_LAST = 1280
_BLOCKS = (1, 2, 3, 4, 3, 3, 1)


def _settings(expand_ratio: int, blocks: Sequence[int] = _BLOCKS) -> list[tuple[int, int, int, int]]:
    """``(t, c, n, s)``: expansion, base channels, blocks and first stride of each block group."""
    t = expand_ratio
    base = [(1, 16, 1), (t, 24, 1), (t, 32, 2), (t, 64, 2), (t, 96, 1), (t, 160, 2), (t, 320, 1)]  # (t, c, s)
    return [(t_, c, n, s) for (t_, c, s), n in zip(base, blocks, strict=True)]


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, same padding) - BN - ReLU as one Sequential (``.0``, ``.1``, ``.2``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN (linear bottleneck).

    The residual is added when ``stride == 1`` and the widths match. ``conv`` holds the eight
    layers (``conv.7`` is the final BN, RepDistiller's "BN before ReLU").

    Args:
        inp: Input channels.
        oup: Output channels.
        stride: Stride of the depthwise conv (1 or 2).
        expand_ratio: Hidden width is ``inp * expand_ratio``.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_residual = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, inp, H, W)`` -> ``(B, oup, H / stride, W / stride)``."""
        out = self.conv(x)  # (B, oup, H', W')
        return x + out if self.use_residual else out


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 for small images.

    Stage taps ``blocks.1, blocks.2, blocks.4, blocks.6`` (outputs of the 24-, 32-, 96- and
    320-channel groups times ``w``, RepDistiller's ``f1`` ... ``f4``; for 32x32 inputs at 16x16,
    8x8, 4x4 and 2x2); ``"fc:input"`` is the pooled penultimate feature ``(B, last_channel)``.

    Args:
        num_classes: Number of output logits.
        width_mult: Width multiplier ``w``.
        expand_ratio: Expansion ``T`` of the blocks after the first group.
        in_channels: Channels of the input image.
        blocks: Inverted-residual blocks ``n`` of each of the seven groups.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width_mult: float = 0.5,
        expand_ratio: int = 6,
        in_channels: int = 3,
        blocks: Sequence[int] = _BLOCKS,
    ) -> None:
        super().__init__()
        if len(blocks) != len(_BLOCKS) or any(n < 1 for n in blocks):
            raise ValueError(f"blocks must be {len(_BLOCKS)} counts >= 1, got {list(blocks)}")
        channels = int(_STEM * width_mult)
        self.conv1 = conv_bn_relu(in_channels, channels, 3, stride=2)
        groups = []
        for t, c, n, s in _settings(expand_ratio, blocks):
            out = int(c * width_mult)
            group = [InvertedResidual(channels, out, s, t)]
            group.extend(InvertedResidual(out, out, 1, t) for _ in range(1, n))
            groups.append(nn.Sequential(*group))
            channels = out
        self.blocks = nn.Sequential(*groups)
        self.last_channel = int(_LAST * width_mult) if width_mult > 1.0 else _LAST
        self.conv2 = conv_bn_relu(channels, self.last_channel, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.last_channel, num_classes)

        fan_out_init(self, linear_std=0.01)

    def feature_taps(self) -> list[str]:
        """Stage outputs, shallow to deep: ``["blocks.1", "blocks.2", "blocks.4", "blocks.6"]``."""
        return ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` (or ``(B, H, W)``) images to ``(B, num_classes)`` logits."""
        if x.dim() == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        x = self.conv1(x)  # (B, 32w, H/2, W/2)
        x = self.blocks(x)  # (B, 320w, H/16, W/16)
        x = self.conv2(x)  # (B, last_channel, H/16, W/16)
        x = torch.flatten(self.avgpool(x), 1)  # (B, last_channel)
        return self.fc(x)  # (B, num_classes)


def build_mobilenetv2(
    name: str,
    num_classes: int,
    input_shape: Sequence[int],
    width_mult: float,
    expand_ratio: int,
    blocks: Sequence[int] = _BLOCKS,
) -> MobileNetV2Cifar:
    """Check the params and build a CIFAR MobileNetV2.

    Raises:
        ConfigError: Bad ``num_classes``, ``input_shape``, ``expand_ratio``, ``blocks``, or a
            ``width_mult`` so small that a layer would get no channels.
    """
    where = f"model {name!r}"
    check_positive(where, num_classes=num_classes, expand_ratio=expand_ratio, blocks=blocks)
    in_channels = image_channels(where, input_shape)
    narrowest = min(_STEM, *(c for _, c, _, _ in _settings(expand_ratio)))
    if not (math.isfinite(width_mult) and int(narrowest * width_mult) >= 1):
        raise ConfigError(
            f"{where}.width_mult: must give every layer at least one channel, i.e. be >= "
            f"{1 / narrowest} (the narrowest group has {narrowest} base channels), got {width_mult!r}"
        )
    return MobileNetV2Cifar(num_classes, width_mult, expand_ratio, in_channels, blocks)


NumClasses = Annotated[int, Field(ge=1)]


@register_model("mobilenetv2")
def mobilenetv2(
    num_classes: NumClasses = 10,
    input_shape: tuple[int, ...] = (3, 32, 32),
    width_mult: Annotated[float, Field(gt=0)] = 0.5,
    expand_ratio: Annotated[int, Field(ge=1)] = 6,
    blocks: tuple[int, int, int, int, int, int, int] = _BLOCKS,
) -> MobileNetV2Cifar:
    """MobileNetV2 for CIFAR (RepDistiller's ``mobile_half`` by default, ~0.81M params on CIFAR-100).

    Args:
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)``.
        width_mult: Width multiplier of every layer but the 1280-channel head (widened only
            when ``width_mult > 1``).
        expand_ratio: Expansion ratio ``T`` of the inverted-residual blocks (the first group
            always uses 1).
        blocks: Blocks ``n`` of each of the seven groups, each >= 1 (the first of a group
            carries its stride; taps stay ``blocks.1, blocks.2, blocks.4, blocks.6``).
    """
    return build_mobilenetv2("mobilenetv2", num_classes, input_shape, width_mult, expand_ratio, blocks)
