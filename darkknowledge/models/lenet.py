"""LeNet-5 and its half-width student, as used for MNIST by DAFL.

LeCun, Bottou, Bengio, Haffner, "Gradient-Based Learning Applied to Document Recognition",
Proc. IEEE 1998 (LeNet-5), in the ReLU / max-pool form of DAFL: Chen et al., "Data-Free
Learning of Student Networks", ICCV 2019 (MNIST experiments: LeNet-5 teacher, LeNet-5-HALF
student; official ``lenet.py`` of huawei-noah/Efficient-Computing):

    conv 5x5 (c1) -> ReLU -> maxpool 2 -> conv 5x5 (c2) -> ReLU -> maxpool 2
    -> conv 5x5 (c3) -> ReLU -> fc (h) -> ReLU -> fc (K)

with ``(c1, c2, c3, h) = (6, 16, 120, 84)`` for ``lenet5`` and ``(3, 8, 60, 42)`` for
``lenet5_half`` (``lenet`` takes any ``widths``: the family that shrunk students are built
from); no padding, biases everywhere, PyTorch's default init. On a 32x32 input the
maps are 28 -> 14 -> 10 -> 5 -> 1 pixels, so the third conv is fully connected to its input:
61,706 (``lenet5``) and 15,738 (``lenet5_half``) parameters for 10 classes, as DAFL's nets.

Other input sizes (H, W >= 28): a smaller image is zero-padded to 32x32 first (module ``pad``;
2 pixels each side for 28x28 MNIST, the same as a first conv with ``padding=2``); a larger one
leaves the third conv with an ``h x w`` map, which the average pool ``pool`` reduces to 1x1 (for
32x32 it is the identity). The parameter count never depends on the input size.

``batch_norm=True`` adds a BatchNorm after each conv and after the hidden linear layer (before
its ReLU), and drops the biases of the layers it follows: data-free methods that match batch
statistics (DeepInversion, Yin et al. CVPR 2020) need BN layers in the teacher.

Module paths (``block*`` / ``head`` are ``nn.Sequential`` with named children)::

    pad                                   (only when the input is smaller than 32x32)
    block1 = conv, [bn], relu, pool       (B, c1, 14, 14) for 32x32
    block2 = conv, [bn], relu, pool       (B, c2, 5, 5)
    block3 = conv, [bn], relu             (B, c3, 1, 1)
    pool, flatten                         (B, c3): DAFL's "feature", also "head:input"
    head   = linear, [bn], relu           (B, h)
    fc                                    (B, K)

Taps ``block1, block2, block3, head``. The penultimate feature (the ``h``-wide output of the
hidden layer after its ReLU) is ``"head"`` and, as in every zoo model, ``"fc:input"``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from darkknowledge.errors import ConfigError
from darkknowledge.models._common import check_positive, image_channels
from darkknowledge.models._registry import register_model

LENET5_WIDTHS = (6, 16, 120, 84)
LENET5_HALF_WIDTHS = (3, 8, 60, 42)
DESIGN_SIDE = 32  # the published net's input size
MIN_SIDE = 28  # smallest accepted input side (MNIST)
KERNEL = 5


def conv_block(in_channels: int, out_channels: int, batch_norm: bool, pool: bool) -> nn.Sequential:
    """``conv`` 5x5 (no padding), optional ``bn``, ``relu``, optional 2x2 max ``pool``."""
    layers: list[tuple[str, nn.Module]] = [("conv", nn.Conv2d(in_channels, out_channels, KERNEL, bias=not batch_norm))]
    if batch_norm:
        layers.append(("bn", nn.BatchNorm2d(out_channels)))
    layers.append(("relu", nn.ReLU()))
    if pool:
        layers.append(("pool", nn.MaxPool2d(kernel_size=2, stride=2)))
    return nn.Sequential(OrderedDict(layers))


def pad_to_design(spatial: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """``(left, right, top, bottom)`` zero padding that brings ``(H, W)`` up to 32x32 per side
    (extra pixel on the right/bottom when the gap is odd), or None when both sides are >= 32."""
    h, w = spatial
    gap_h, gap_w = max(DESIGN_SIDE - h, 0), max(DESIGN_SIDE - w, 0)
    if gap_h == 0 and gap_w == 0:
        return None
    return (gap_w // 2, gap_w - gap_w // 2, gap_h // 2, gap_h - gap_h // 2)


class LeNet5(nn.Module):
    """LeNet-5 (ReLU, max-pool) with configurable widths; see the module docstring for paths.

    Args:
        widths: ``(c1, c2, c3, h)``: channels of the three convs and width of the hidden layer.
        num_classes: Number of output logits.
        in_channels: Channels of the input image.
        spatial: Input ``(H, W)``, each >= 28.
        batch_norm: BatchNorm after each conv and the hidden linear layer.
    """

    def __init__(
        self,
        widths: Sequence[int] = LENET5_WIDTHS,
        num_classes: int = 10,
        in_channels: int = 1,
        spatial: tuple[int, int] = (DESIGN_SIDE, DESIGN_SIDE),
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        c1, c2, c3, hidden = widths
        padding = pad_to_design(spatial)
        self.pad = nn.ZeroPad2d(padding) if padding is not None else None
        self.block1 = conv_block(in_channels, c1, batch_norm, pool=True)
        self.block2 = conv_block(c1, c2, batch_norm, pool=True)
        self.block3 = conv_block(c2, c3, batch_norm, pool=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        head: list[tuple[str, nn.Module]] = [("linear", nn.Linear(c3, hidden, bias=not batch_norm))]
        if batch_norm:
            head.append(("bn", nn.BatchNorm1d(hidden)))
        head.append(("relu", nn.ReLU()))
        self.head = nn.Sequential(OrderedDict(head))
        self.fc = nn.Linear(hidden, num_classes)

    def feature_taps(self) -> list[str]:
        """Stage outputs, shallow to deep: ``["block1", "block2", "block3", "head"]``.

        ``"head"`` is the penultimate ``(B, h)`` feature (after ReLU), the same tensor as
        ``"fc:input"``; ``"head:input"`` is the ``(B, c3)`` conv feature DAFL returns.
        """
        return ["block1", "block2", "block3", "head"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` (or ``(B, H, W)`` for 1 channel) images to ``(B, num_classes)``."""
        if x.dim() == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        if self.pad is not None:
            x = self.pad(x)  # (B, C, 32, 32) for a smaller input
        x = self.block1(x)  # (B, c1, (H-4)/2, (W-4)/2)
        x = self.block2(x)  # (B, c2, 5, 5) for 32x32
        x = self.block3(x)  # (B, c3, 1, 1) for 32x32
        x = self.flatten(self.pool(x))  # (B, c3)
        x = self.head(x)  # (B, h)
        return self.fc(x)  # (B, num_classes)


def build_lenet(
    name: str,
    widths: Sequence[int],
    num_classes: int,
    input_shape: Sequence[int],
    batch_norm: bool,
) -> LeNet5:
    """Check the framework-filled params and build a LeNet-5.

    Raises:
        ConfigError: Bad ``num_classes``, or an ``input_shape`` that is not an image of at
            least 28x28.
    """
    where = f"model {name!r}"
    check_positive(where, num_classes=num_classes)
    in_channels = image_channels(where, input_shape)
    spatial = (int(input_shape[-2]), int(input_shape[-1]))
    if min(spatial) < MIN_SIDE:
        raise ConfigError(
            f"{where}.input_shape: LeNet-5 needs images of at least {MIN_SIDE}x{MIN_SIDE} "
            f"(smaller ones are padded to 32x32), got {tuple(input_shape)!r}; for small images use 'cnn2d'"
        )
    return LeNet5(widths, num_classes, in_channels, spatial, batch_norm)


NumClasses = Annotated[int, Field(ge=1)]


@register_model("lenet")
def lenet(
    num_classes: NumClasses = 10,
    input_shape: tuple[int, ...] = (1, 32, 32),
    widths: tuple[int, int, int, int] = LENET5_WIDTHS,
    batch_norm: bool = False,
) -> LeNet5:
    """LeNet-5 with any widths ``(c1, c2, c3, h)`` (the default is ``lenet5``).

    Args:
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)``, ``H, W >= 28`` (below 32 zero-padded to 32).
        widths: Channels of the three convs and width of the hidden layer, each >= 1.
        batch_norm: BatchNorm after each conv and the hidden layer (biases dropped there).

    Returns:
        The model; taps ``block1, block2, block3, head``; penultimate ``head`` = ``fc:input``.
    """
    check_positive("model 'lenet'", widths=widths)
    return build_lenet("lenet", widths, num_classes, input_shape, batch_norm)


@register_model("lenet5")
def lenet5(
    num_classes: NumClasses = 10,
    input_shape: tuple[int, ...] = (1, 32, 32),
    batch_norm: bool = False,
) -> LeNet5:
    """LeNet-5 (6, 16, 120 conv channels, 84 hidden; 61,706 params for 10 classes), DAFL's teacher.

    Args:
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)``, ``H, W >= 28`` (below 32 zero-padded to 32).
        batch_norm: BatchNorm after each conv and the hidden layer (biases dropped there).

    Returns:
        The model; taps ``block1, block2, block3, head``; penultimate ``head`` = ``fc:input``.
    """
    return build_lenet("lenet5", LENET5_WIDTHS, num_classes, input_shape, batch_norm)


@register_model("lenet5_half")
def lenet5_half(
    num_classes: NumClasses = 10,
    input_shape: tuple[int, ...] = (1, 32, 32),
    batch_norm: bool = False,
) -> LeNet5:
    """LeNet-5-HALF (3, 8, 60 conv channels, 42 hidden; 15,738 params for 10 classes), DAFL's student.

    Args:
        num_classes: Number of output logits.
        input_shape: ``(C, H, W)`` or ``(H, W)``, ``H, W >= 28`` (below 32 zero-padded to 32).
        batch_norm: BatchNorm after each conv and the hidden layer (biases dropped there).

    Returns:
        The model; taps ``block1, block2, block3, head``; penultimate ``head`` = ``fc:input``.
    """
    return build_lenet("lenet5_half", LENET5_HALF_WIDTHS, num_classes, input_shape, batch_norm)
