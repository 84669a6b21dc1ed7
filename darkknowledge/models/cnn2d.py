"""A small 2-D CNN for digits, MNIST and CIFAR-sized images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from darkknowledge.errors import ConfigError
from darkknowledge.models._common import check_positive, image_channels
from darkknowledge.models._registry import register_model


class CNN2d(nn.Module):
    """Conv blocks, global average pooling, an optional hidden layer, a linear classifier.

    Each block is (Conv2d 3x3, BatchNorm2d if enabled, ReLU, MaxPool2d(2)); the max-pool is
    left out once the feature map is 1 pixel high or wide, so any input size works (an 8x8
    digit as well as a 32x32 CIFAR image). With ``block_layers = k`` a block holds ``k``
    (Conv2d, [BatchNorm2d], ReLU) layers before its max-pool (``blocks.i.0`` is always the
    first conv), so the blocks stay the stages.

    Module paths: ``blocks.0`` ... ``blocks.{n-1}``, ``pool``, ``flatten``, ``head`` (only
    when ``hidden > 0``), ``fc``. ``"fc:input"`` is the penultimate feature.

    Args:
        in_channels: Channels of the input image.
        spatial: Input ``(H, W)``.
        num_classes: Number of output logits.
        channels: Output channels of each conv block, shallow to deep.
        hidden: Width of the hidden linear layer before ``fc`` (0: none).
        batch_norm: Put a BatchNorm2d after each conv.
        block_layers: Conv layers in each block.
    """

    def __init__(
        self,
        in_channels: int,
        spatial: tuple[int, int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        batch_norm: bool = True,
        block_layers: int = 1,
    ) -> None:
        super().__init__()
        h, w = spatial
        blocks: list[nn.Module] = []
        width = in_channels
        for out in channels:
            layers: list[nn.Module] = []
            for _ in range(block_layers):
                layers.append(nn.Conv2d(width, out, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out))
                layers.append(nn.ReLU())
                width = out
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU()) if hidden > 0 else None
        width = hidden if hidden > 0 else width
        self.fc = nn.Linear(width, num_classes)

    def feature_taps(self) -> list[str]:
        """Paths of the conv-block outputs (feature maps), shallow to deep.

        The penultimate vector (after ``head``) is ``"fc:input"``, as in every zoo model.
        """
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` (or ``(B, H, W)`` for 1 channel) images to ``(B, num_classes)``."""
        if x.dim() == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        f = self.blocks(x)  # (B, channels[-1], H', W')
        f = self.flatten(self.pool(f))  # (B, channels[-1])
        if self.head is not None:
            f = self.head(f)  # (B, hidden)
        return self.fc(f)  # (B, num_classes)


@register_model("cnn2d")
def cnn2d(
    num_classes: Annotated[int, Field(ge=1)] = 10,
    input_shape: tuple[int, ...] = (1, 28, 28),
    channels: tuple[int, ...] = (32, 64),
    hidden: Annotated[int, Field(ge=0)] = 128,
    batch_norm: bool = True,
    block_layers: Annotated[int, Field(ge=1)] = 1,
) -> CNN2d:
    """Build a small 2-D CNN for any image size.

    Args:
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)`` (one channel).
        channels: Output channels of each conv block; each block halves H and W while >= 2.
        hidden: Width of a hidden linear layer before the classifier (0: none).
        batch_norm: Use BatchNorm2d after each conv.
        block_layers: Conv layers per block, all at the block's width (the depth of a stage,
            which ``darkknowledge.students.shrink`` scales).

    Returns:
        The model; taps ``blocks.0`` ..., penultimate feature ``fc:input``.
    """
    where = "model 'cnn2d'"
    check_positive(where, num_classes=num_classes, channels=channels, block_layers=block_layers)
    if not channels:
        raise ConfigError(f"{where}.channels: give at least one conv block (got ())")
    in_channels = image_channels(where, input_shape)
    spatial = (int(input_shape[-2]), int(input_shape[-1]))
    return CNN2d(in_channels, spatial, num_classes, tuple(channels), hidden, batch_norm, block_layers)
