"""A depthwise-separable 1-D CNN for signals such as MNIST-1D: ``cnn1d`` with efficient operations.

Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications", arXiv:1704.04861, 2017, Sec. 3.1 (Fig. 3): a standard convolution is factorized
into a depthwise convolution (one ``k``-tap filter per input channel) followed by a 1x1
pointwise convolution that mixes the channels, each followed by BatchNorm and ReLU. A
``k``-tap convolution from ``M`` to ``N`` channels costs ``k M N`` multiply-adds per output
position; the separable one ``k M + M N``, i.e. ``1/N + 1/k`` of it (the paper's
``1/N + 1/D_K^2`` for ``D_K x D_K`` kernels). As in MobileNets (Table 1) the first layer stays a
full convolution: on a one-channel signal a depthwise filter would leave a single feature.

The layout, strides, padding and classifier are ``cnn1d``'s (:mod:`darkknowledge.models.cnn1d`),
so the two share their interface and tap names: ``depth`` blocks, the first at stride 1 and
each later one halving the length, ``padding = kernel_size // 2``, flatten, ``fc``.

Module paths::

    blocks.0      = [conv0]        + (block_layers - 1) x [sep]    (B, channels, L)
    blocks.i      = [sep stride 2] + (block_layers - 1) x [sep]    (B, channels, L / 2^i)
    flatten, fc                                                    (B, channels * L'), (B, K)

    conv0 = Sequential(conv, [bn], relu)                             a full k-tap convolution
    sep   = Sequential(dw, [dw_bn], dw_relu, pw, [pw_bn], relu)      depthwise k-tap, pointwise 1x1

``blocks.i.0`` is a block's first layer, ``blocks.i.0.pw`` its pointwise conv. Without
``batch_norm`` the convs carry biases and the BN layers are left out (as in ``cnn1d``).
Default (``channels=32, depth=3, kernel_size=5``, 40-sample input, 10 classes): 5,898
parameters, against 13,706 for ``cnn1d``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated

from pydantic import Field
from torch import nn

from darkknowledge.models._common import check_positive, sequence_channels_length
from darkknowledge.models._registry import register_model
from darkknowledge.models.cnn1d import BlockStack1d


def full_layer(in_channels: int, out_channels: int, kernel_size: int, stride: int, batch_norm: bool) -> nn.Sequential:
    """``conv`` (k taps, ``padding = k // 2``), optional ``bn``, ``relu``: ``(B, M, L) -> (B, N, L')``."""
    layers: list[tuple[str, nn.Module]] = [
        (
            "conv",
            nn.Conv1d(
                in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=not batch_norm
            ),
        ),
    ]
    if batch_norm:
        layers.append(("bn", nn.BatchNorm1d(out_channels)))
    layers.append(("relu", nn.ReLU()))
    return nn.Sequential(OrderedDict(layers))


def separable_layer(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, batch_norm: bool
) -> nn.Sequential:
    """Depthwise ``dw`` (k taps, groups = M, the stride) then pointwise ``pw`` (1x1), each with
    optional BN and a ReLU: ``(B, M, L) -> (B, M, L') -> (B, N, L')`` (MobileNets Fig. 3 right)."""
    layers: list[tuple[str, nn.Module]] = [
        (
            "dw",
            nn.Conv1d(
                in_channels,
                in_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=in_channels,
                bias=not batch_norm,
            ),
        ),
    ]
    if batch_norm:
        layers.append(("dw_bn", nn.BatchNorm1d(in_channels)))
    layers += [("dw_relu", nn.ReLU()), ("pw", nn.Conv1d(in_channels, out_channels, 1, bias=not batch_norm))]
    if batch_norm:
        layers.append(("pw_bn", nn.BatchNorm1d(out_channels)))
    layers.append(("relu", nn.ReLU()))
    return nn.Sequential(OrderedDict(layers))


class DSCNN1d(BlockStack1d):
    """``depth`` blocks of depthwise-separable layers (the very first layer a full conv), flattened,
    then a linear classifier; see the module docstring for the paths.

    Args:
        in_channels: Channels of the input signal.
        length: Length of the input signal.
        num_classes: Number of output logits.
        channels: Output channels of every layer.
        depth: Number of blocks (the first at stride 1, the rest at stride 2).
        kernel_size: Taps of the full and the depthwise convs.
        batch_norm: BatchNorm after every conv (then the convs have no bias).
        block_layers: Layers per block (the extra ones keep the length).
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
        """The network's first layer a full conv, every other one depthwise-separable."""
        make = full_layer if first else separable_layer
        return [make(in_channels, out_channels, kernel_size, stride, batch_norm)]


@register_model("dscnn1d")
def dscnn1d(
    num_classes: Annotated[int, Field(ge=1)] = 10,
    input_shape: tuple[int, ...] = (40,),
    channels: Annotated[int, Field(ge=1)] = 32,
    depth: Annotated[int, Field(ge=1)] = 3,
    kernel_size: Annotated[int, Field(ge=1)] = 5,
    batch_norm: bool = False,
    block_layers: Annotated[int, Field(ge=1)] = 1,
) -> DSCNN1d:
    """Build a depthwise-separable 1-D CNN (``cnn1d``'s layout with MobileNets' factorized convs).

    Args:
        num_classes: Number of output logits.
        input_shape: ``(L,)`` or ``(C, L)``; a 2-D input batch ``(B, L)`` gets a channel dim.
        channels: Output channels of every layer.
        depth: Number of blocks (first stride 1, the rest stride 2).
        kernel_size: Taps of the first full conv and of every depthwise conv.
        batch_norm: BatchNorm after every conv (the convs then have no bias).
        block_layers: Layers per block: its first one plus ``block_layers - 1`` stride-1 separable
            layers (the depth of a stage, which ``darkknowledge.students.shrink`` scales).

    Returns:
        The model; taps ``blocks.0`` ... , penultimate feature ``fc:input``.
    """
    where = "model 'dscnn1d'"
    check_positive(
        where,
        num_classes=num_classes,
        channels=channels,
        depth=depth,
        kernel_size=kernel_size,
        block_layers=block_layers,
    )
    in_channels, length = sequence_channels_length(where, input_shape)
    return DSCNN1d(in_channels, length, num_classes, channels, depth, kernel_size, batch_norm, block_layers)
