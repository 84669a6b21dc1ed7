"""ImageNet ResNet-18 and ResNet-34 (He et al. 2016), laid out as torchvision's ``resnet18``/``resnet34``.

A 7x7 stride-2 conv-BN-ReLU stem of 64 channels and a 3x3 stride-2 max pool, four stages of
BasicBlocks (two 3x3 conv-BN, ReLU after the sum) at 64, 128, 256, 512 channels with 2-2-2-2
(ResNet-18) or 3-4-6-3 (ResNet-34) blocks, stride 2 in the first block of stages 2-4 with a
1x1 conv-BN projection shortcut (option B), then global average pool and ``fc``. A 224x224
input leaves the stages at 56, 28, 14 and 7 pixels (32x downsampling).

The parameter names and shapes are torchvision's (``conv1, bn1, layer1`` ... ``layer4, fc``;
inside a block ``conv1, bn1, conv2, bn2, downsample.0, downsample.1``), so a torchvision
state dict loads as is: 11,689,512 (ResNet-18) and 21,797,672 (ResNet-34) parameters for 1000
classes. Differences, none of which changes the parameters: each block has a second ReLU
module ``relu_out`` (torchvision reuses one ``relu``; ``"<block>.relu_out:input"`` is the
pre-activation); no in-place ops; any number of input channels; and ``forward`` returns
logits only (features come from hooks). The blocks are the zoo's CIFAR-ResNet BasicBlocks.

``resnet_imagenet`` builds the same layout with any blocks per stage, stage widths (the stem
has the first stage's width) and either stem: the family shrunk students are built from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from darkknowledge.models._common import check_positive, image_channels
from darkknowledge.models._registry import register_model
from darkknowledge.models.resnet_cifar import BasicBlock

_WIDTHS = (64, 128, 256, 512)


class ResNetImageNet(nn.Module):
    """A four-stage ResNet of BasicBlocks with the ImageNet stem (or the CIFAR one).

    Stage taps ``layer1`` ... ``layer4`` (post-ReLU stage outputs, 64/128/256/512 channels at
    H/4, H/8, H/16, H/32; with the CIFAR stem at H, H/2, H/4, H/8); ``"fc:input"`` is the pooled
    penultimate feature ``(B, 512)``.

    Args:
        blocks: Number of BasicBlocks in each of the four stages.
        num_classes: Number of output logits.
        in_channels: Channels of the input image.
        stem: ``imagenet`` (7x7 stride-2 conv, 3x3 stride-2 max pool, Kaiming fan-out init as
            torchvision) or ``cifar`` (3x3 stride-1 conv, no pooling, PyTorch's default init: the
            kuangliu/pytorch-cifar ResNets, :mod:`darkknowledge.models.resnet_cifar_kl`).
        widths: Channels of the four stages; the stem has ``widths[0]``.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: Literal["imagenet", "cifar"] = "imagenet",
        widths: Sequence[int] = _WIDTHS,
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or any(n < 1 for n in blocks):
            raise ValueError(f"blocks must be four counts >= 1, got {list(blocks)}")
        if len(widths) != 4 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be four channel counts >= 1, got {list(widths)}")
        self.inplanes = widths[0]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        self.layer1 = self._make_layer(widths[0], blocks[0])
        self.layer2 = self._make_layer(widths[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(widths[2], blocks[2], stride=2)
        self.layer4 = self._make_layer(widths[3], blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)
        if stem == "cifar":
            return  # PyTorch's default init, as kuangliu's and DAFL's code
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        """One stage: ``blocks`` BasicBlocks, the first one with ``stride`` and a projection if needed."""
        downsample = None
        out_planes = planes * BasicBlock.expansion
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_planes
        layers.extend(BasicBlock(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def feature_taps(self) -> list[str]:
        """Stage outputs, shallow to deep: ``["layer1", "layer2", "layer3", "layer4"]``."""
        return ["layer1", "layer2", "layer3", "layer4"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` (or ``(B, H, W)``) images to ``(B, num_classes)`` logits."""
        if x.dim() == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4); CIFAR stem: (B, 64, H, W)
        x = self.layer1(x)  # (B, 64, H/4, W/4)
        x = self.layer2(x)  # (B, 128, H/8, W/8)
        x = self.layer3(x)  # (B, 256, H/16, W/16)
        x = self.layer4(x)  # (B, 512, H/32, W/32); CIFAR stem: (B, 512, H/8, W/8)
        x = torch.flatten(self.avgpool(x), 1)  # (B, 512)
        return self.fc(x)  # (B, num_classes)


def build_resnet_imagenet(
    name: str,
    blocks: Sequence[int],
    num_classes: int,
    input_shape: Sequence[int],
    stem: Literal["imagenet", "cifar"] = "imagenet",
    widths: Sequence[int] = _WIDTHS,
) -> ResNetImageNet:
    """Check the framework-filled params and build a four-stage ResNet (ImageNet or CIFAR stem).

    Raises:
        ConfigError: Bad ``num_classes``, ``input_shape``, ``blocks`` or ``widths``.
    """
    where = f"model {name!r}"
    check_positive(where, num_classes=num_classes, blocks=blocks, widths=widths)
    return ResNetImageNet(blocks, num_classes, image_channels(where, input_shape), stem, widths)


NumClasses = Annotated[int, Field(ge=1)]


@register_model("resnet_imagenet")
def resnet_imagenet(
    num_classes: NumClasses = 1000,
    input_shape: tuple[int, ...] = (3, 224, 224),
    blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
    widths: tuple[int, int, int, int] = _WIDTHS,
    stem: Literal["imagenet", "cifar"] = "imagenet",
) -> ResNetImageNet:
    """A four-stage BasicBlock ResNet with any blocks and widths (default: ``resnet18``).

    Args:
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)``.
        blocks: BasicBlocks in each of the four stages, each >= 1 (``resnet34``: 3, 4, 6, 3).
        widths: Channels of the four stages, each >= 1; the stem has ``widths[0]``.
        stem: ``imagenet`` (``resnet18``/``resnet34``) or ``cifar`` (``resnet18_cifar``/``resnet34_cifar``).
    """
    return build_resnet_imagenet("resnet_imagenet", blocks, num_classes, input_shape, stem, widths)


@register_model("resnet18")
def resnet18(num_classes: NumClasses = 1000, input_shape: tuple[int, ...] = (3, 224, 224)) -> ResNetImageNet:
    """ResNet-18 for ImageNet (2-2-2-2 blocks, 11,689,512 params for 1000 classes)."""
    return build_resnet_imagenet("resnet18", (2, 2, 2, 2), num_classes, input_shape)


@register_model("resnet34")
def resnet34(num_classes: NumClasses = 1000, input_shape: tuple[int, ...] = (3, 224, 224)) -> ResNetImageNet:
    """ResNet-34 for ImageNet (3-4-6-3 blocks, 21,797,672 params for 1000 classes)."""
    return build_resnet_imagenet("resnet34", (3, 4, 6, 3), num_classes, input_shape)
