"""VGG with BatchNorm for CIFAR as in the CRD / RepDistiller codebase (Simonyan & Zisserman 2015).

Five blocks of 3x3 conv (with bias) - BN - ReLU layers; the last ReLU of every block is taken
out of the block, so a block ends in its BN (the pre-activation) and the ReLU follows it as a
separate module. Max pools (2x2) sit between blocks 0-1, 1-2 and 2-3; the pool between blocks
3 and 4 is used only for inputs at least 64 pixels high (RepDistiller: exactly 64, for
TinyImageNet), so a 32x32 input reaches block 4 at 4x4. The FC layers of the original VGG are
removed: global average pool, then one ``Linear(512, num_classes)``.

Layers per block (``vgg8`` / ``11`` / ``13`` / ``16`` / ``19``; widths 64, 128, 256, 512, 512):
``1-1-1-1-1``, ``1-1-2-2-2``, ``2-2-2-2-2``, ``2-2-3-3-3``, ``2-2-4-4-4``. RepDistiller's
``vgg8`` ... ``vgg19`` entries are its ``*_bn`` builders; these are the same networks. ``vgg``
takes any layers per block and block widths: the family shrunk students are built from.

Module names follow RepDistiller's ``models/vgg.py`` (``block0`` ... ``block4``, ``pool0`` ...
``pool3``) with these differences, none of which changes the parameters: the post-block ReLUs
are modules ``relu0`` ... ``relu4`` (hookable; ``"reluK:input"`` is RepDistiller's
``fK_pre``), the final pool is ``avgpool`` (adaptive) and the classifier is ``fc`` (RepDistiller:
``pool4``, ``classifier``); no in-place ops; any number of input channels; the max pools use
``ceil_mode`` (identical for even sizes; odd and tiny inputs never shrink to zero); and
``forward`` returns logits only (features come from hooks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from darkknowledge.models._common import check_positive, fan_out_init, image_channels
from darkknowledge.models._registry import register_model

_WIDTHS = (64, 128, 256, 512, 512)
_LAYERS: dict[str, tuple[int, int, int, int, int]] = {
    "vgg8": (1, 1, 1, 1, 1),
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}
_POOL3_MIN_HEIGHT = 64


def make_block(in_channels: int, width: int, layers: int) -> nn.Sequential:
    """``layers`` conv3x3-BN(-ReLU) layers at ``width``; the block ends in a BN (no final ReLU).

    Args:
        in_channels: Input channels of the first conv.
        width: Output channels of every conv.
        layers: Number of convs.
    """
    modules: list[nn.Module] = []
    for i in range(layers):
        modules += [
            nn.Conv2d(in_channels if i == 0 else width, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
    return nn.Sequential(*modules[:-1])


class VGGCifar(nn.Module):
    """A five-block VGG with BatchNorm for small images.

    Stage taps ``relu1, relu2, relu3, relu4`` (post-ReLU outputs of blocks 1-4, RepDistiller's
    ``f1`` ... ``f4``; for 32x32 inputs 128/256/512/512 channels at 16x16, 8x8, 4x4, 4x4);
    ``"fc:input"`` is the pooled penultimate feature ``(B, widths[4])`` (512).

    Args:
        layers: Number of convs in each of the five blocks.
        num_classes: Number of output logits.
        in_channels: Channels of the input image.
        widths: Channels of the five blocks.
    """

    def __init__(
        self, layers: Sequence[int], num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] = _WIDTHS
    ) -> None:
        super().__init__()
        if len(layers) != 5 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be five counts >= 1, got {list(layers)}")
        if len(widths) != 5 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be five channel counts >= 1, got {list(widths)}")
        ins = (in_channels, *widths[:-1])
        self.block0 = make_block(ins[0], widths[0], layers[0])
        self.block1 = make_block(ins[1], widths[1], layers[1])
        self.block2 = make_block(ins[2], widths[2], layers[2])
        self.block3 = make_block(ins[3], widths[3], layers[3])
        self.block4 = make_block(ins[4], widths[4], layers[4])
        self.relu0, self.relu1, self.relu2 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.relu3, self.relu4 = nn.ReLU(), nn.ReLU()
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[4], num_classes)

        fan_out_init(self, linear_std=0.01)

    def feature_taps(self) -> list[str]:
        """Stage outputs, shallow to deep: ``["relu1", "relu2", "relu3", "relu4"]``."""
        return ["relu1", "relu2", "relu3", "relu4"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` (or ``(B, H, W)``) images to ``(B, num_classes)`` logits."""
        if x.dim() == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        height = x.shape[-2]
        x = self.pool0(self.relu0(self.block0(x)))  # (B, w0, H/2, W/2); w = widths
        x = self.pool1(self.relu1(self.block1(x)))  # (B, w1, H/4, W/4)
        x = self.pool2(self.relu2(self.block2(x)))  # (B, w2, H/8, W/8)
        x = self.relu3(self.block3(x))  # (B, w3, H/8, W/8)
        if height >= _POOL3_MIN_HEIGHT:
            x = self.pool3(x)  # (B, w3, H/16, W/16)
        x = self.relu4(self.block4(x))  # (B, w4, H/8 or H/16, ...)
        x = torch.flatten(self.avgpool(x), 1)  # (B, w4)
        return self.fc(x)  # (B, num_classes)


def build_vgg(name: str, num_classes: int, input_shape: Sequence[int]) -> VGGCifar:
    """Check the framework-filled params and build the named VGG.

    Args:
        name: One of ``vgg8``, ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``.
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)``.

    Raises:
        ConfigError: Bad ``num_classes`` or ``input_shape``.
    """
    where = f"model {name!r}"
    check_positive(where, num_classes=num_classes)
    return VGGCifar(_LAYERS[name], num_classes, image_channels(where, input_shape))


NumClasses = Annotated[int, Field(ge=1)]


@register_model("vgg")
def vgg(
    num_classes: NumClasses = 10,
    input_shape: tuple[int, ...] = (3, 32, 32),
    layers: tuple[int, int, int, int, int] = _LAYERS["vgg8"],
    widths: tuple[int, int, int, int, int] = _WIDTHS,
) -> VGGCifar:
    """A CIFAR VGG with BN, any convs per block and block widths (default: ``vgg8``).

    Args:
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)``.
        layers: Convs in each of the five blocks, each >= 1 (``vgg13``: 2, 2, 2, 2, 2).
        widths: Channels of the five blocks, each >= 1.

    Raises:
        ConfigError: Bad ``num_classes``, ``input_shape``, ``layers`` or ``widths``.
    """
    where = "model 'vgg'"
    check_positive(where, num_classes=num_classes, layers=layers, widths=widths)
    return VGGCifar(layers, num_classes, image_channels(where, input_shape), widths)


@register_model("vgg8")
def vgg8(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> VGGCifar:
    """VGG-8 with BN (one conv per block, ~3.96M params on CIFAR-100)."""
    return build_vgg("vgg8", num_classes, input_shape)


@register_model("vgg11")
def vgg11(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> VGGCifar:
    """VGG-11 with BN (convs per block 1-1-2-2-2, ~9.28M params on CIFAR-100)."""
    return build_vgg("vgg11", num_classes, input_shape)


@register_model("vgg13")
def vgg13(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> VGGCifar:
    """VGG-13 with BN (convs per block 2-2-2-2-2, ~9.46M params on CIFAR-100)."""
    return build_vgg("vgg13", num_classes, input_shape)


@register_model("vgg16")
def vgg16(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> VGGCifar:
    """VGG-16 with BN (convs per block 2-2-3-3-3, ~14.77M params on CIFAR-100)."""
    return build_vgg("vgg16", num_classes, input_shape)


@register_model("vgg19")
def vgg19(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> VGGCifar:
    """VGG-19 with BN (convs per block 2-2-4-4-4, ~20.09M params on CIFAR-100)."""
    return build_vgg("vgg19", num_classes, input_shape)
