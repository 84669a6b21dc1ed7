"""A small 1-D CNN for signals such as MNIST-1D."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from darkknowledge.models._common import check_positive, sequence_channels_length
from darkknowledge.models._registry import register_model


def _conv_out_len(length: int, kernel_size: int, stride: int, padding: int) -> int:
    """Output length of a 1-D convolution (dilation 1)."""
    return (length + 2 * padding - kernel_size) // stride + 1


class BlockStack1d(nn.Module):
    """A 1-D CNN laid out as ``blocks`` (a Sequential of blocks), ``flatten`` and ``fc``: the
    taps and forward pass shared by ``cnn1d`` and ``dscnn1d`` (subclasses build the three)."""

    blocks: nn.Sequential
    flatten: nn.Flatten
    fc: nn.Linear

    def make_layer(
        self, first: bool, in_channels: int, out_channels: int, kernel_size: int, stride: int, batch_norm: bool
    ) -> list[nn.Module]:
        """The modules of one layer (``first``: the network's very first one), appended to its block."""
        raise NotImplementedError

    def build(
        self,
        in_channels: int,
        length: int,
        num_classes: int,
        channels: int,
        depth: int,
        kernel_size: int,
        batch_norm: bool,
        block_layers: int,
    ) -> None:
        """``depth`` blocks of ``block_layers`` layers (a block's first at stride 2, the first
        block's at 1; ``padding = kernel_size // 2``), then ``flatten`` and ``fc``."""
        blocks: list[nn.Module] = []
        width, cur_len = in_channels, length
        for i in range(depth):
            layers: list[nn.Module] = []
            for j in range(block_layers):
                stride = 2 if i > 0 and j == 0 else 1
                layers += self.make_layer(i == 0 and j == 0, width, channels, kernel_size, stride, batch_norm)
                width = channels
                cur_len = _conv_out_len(cur_len, kernel_size, stride, kernel_size // 2)  # >= 1 with this padding
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * cur_len, num_classes)

    def feature_taps(self) -> list[str]:
        """Paths of the conv-block outputs ``(B, channels, L_i)``, shallow to deep."""
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, L)`` or ``(B, C, L)`` signals to ``(B, num_classes)`` logits."""
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (B, 1, L)
        h = self.blocks(x)  # (B, channels, L')
        h = self.flatten(h)  # (B, channels * L')
        return self.fc(h)  # (B, num_classes)


class CNN1d(BlockStack1d):
    """``depth`` blocks of (Conv1d, BatchNorm1d if enabled, ReLU), flattened, then a linear classifier.

    The first conv has stride 1, the others stride 2 (each halves the length); all use
    ``padding = kernel_size // 2``. This follows the MNIST-1D paper's small CNN. With
    ``block_layers = k`` a block holds ``k`` (Conv1d, [BatchNorm1d], ReLU) layers in order, the
    first with the block's stride and the rest with stride 1 (``blocks.i.0`` is always the
    first conv), so the blocks stay the stages.

    Module paths: ``blocks.0`` ... ``blocks.{depth-1}``, ``flatten``, ``fc``.
    ``"fc:input"`` is the penultimate feature (the flattened last feature map).

    Args:
        in_channels: Channels of the input signal.
        length: Length of the input signal.
        num_classes: Number of output logits.
        channels: Channels of every conv layer.
        depth: Number of conv layers.
        kernel_size: Kernel size of every conv layer.
        batch_norm: Put a BatchNorm1d after each conv (data-free methods such as DeepInversion
            read a teacher's batch-norm statistics).
        block_layers: Conv layers in each block.
    """

    def __init__(
        self,
        in_channels: int,
        length: int,
        num_classes: int,
        channels: int = 32,
        depth: int = 3,
        kernel_size: int = 5,
        batch_norm: bool = False,
        block_layers: int = 1,
    ) -> None:
        super().__init__()
        self.build(in_channels, length, num_classes, channels, depth, kernel_size, batch_norm, block_layers)

    def make_layer(
        self, first: bool, in_channels: int, out_channels: int, kernel_size: int, stride: int, batch_norm: bool
    ) -> list[nn.Module]:
        """Conv1d (``padding = kernel_size // 2``), BatchNorm1d if enabled, ReLU."""
        conv = nn.Conv1d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=not batch_norm
        )
        return [conv, *([nn.BatchNorm1d(out_channels)] if batch_norm else []), nn.ReLU()]


@register_model("cnn1d")
def cnn1d(
    num_classes: Annotated[int, Field(ge=1)] = 10,
    input_shape: tuple[int, ...] = (40,),
    channels: Annotated[int, Field(ge=1)] = 32,
    depth: Annotated[int, Field(ge=1)] = 3,
    kernel_size: Annotated[int, Field(ge=1)] = 5,
    batch_norm: bool = False,
    block_layers: Annotated[int, Field(ge=1)] = 1,
) -> CNN1d:
    """Build a small 1-D CNN (MNIST-1D style).

    Args:
        num_classes: Number of output logits.
        input_shape: ``(L,)`` or ``(C, L)``; a 2-D input batch ``(B, L)`` gets a channel dim.
        channels: Channels of every conv layer.
        depth: Number of conv layers (first stride 1, the rest stride 2).
        kernel_size: Kernel size of every conv layer.
        batch_norm: A BatchNorm1d after each conv (the conv then has no bias).
        block_layers: Conv layers per block (the extra ones keep the length; the depth of a
            stage, which ``darkknowledge.students.shrink`` scales).

    Returns:
        The model; taps ``blocks.0`` ... , penultimate feature ``fc:input``.
    """
    where = "model 'cnn1d'"
    check_positive(
        where,
        num_classes=num_classes,
        channels=channels,
        depth=depth,
        kernel_size=kernel_size,
        block_layers=block_layers,
    )
    in_channels, length = sequence_channels_length(where, input_shape)
    return CNN1d(in_channels, length, num_classes, channels, depth, kernel_size, batch_norm, block_layers)
