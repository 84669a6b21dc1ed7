"""Students with efficient operations: every full convolution made depthwise-separable.

Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications", arXiv:1704.04861, 2017, Sec. 3.1. A standard convolution with ``D_K x D_K``
kernels from ``M`` to ``N`` channels on a ``D_F x D_F`` map costs (Eq. 2)::

    D_K * D_K * M * N * D_F * D_F

A depthwise convolution (one filter per input channel, Eq. 4: ``D_K * D_K * M * D_F * D_F``)
followed by a 1x1 pointwise convolution (``M * N * D_F * D_F``) costs their sum (Eq. 5), which
is, relative to the standard convolution::

    1/N + 1/D_K^2

(8 to 9 times less for 3x3 kernels); the weights shrink by the same ratio. For any kernel shape
(1-D ``k``, 2-D ``kh x kw``) ``D_K^2`` is the number of taps (:func:`separable_cost_ratio`).

:func:`to_depthwise` replaces, in place, every ``nn.Conv1d``/``nn.Conv2d`` that mixes channels
spatially (``groups == 1``, more than one tap, more than one input channel) by a
:class:`DepthwiseSeparable`: the depthwise conv with the original kernel, stride, padding,
dilation and padding mode (``groups = M``, no bias), a BatchNorm over its ``M`` channels, then
the pointwise conv to ``N`` channels with the original conv's bias (if it had one). MobileNets
follows the depthwise BN with a ReLU as well; here the BN alone sits in between, so the module
stays a drop-in replacement for a linear operator: the original conv's own BN and activation
(if any) follow the pointwise conv as before. Output shapes are unchanged, so every module path
outside the replaced convs, every tap and every feature-loss pair stay valid. Convs that are
already grouped, 1x1, or read a single channel (a grayscale stem) are left alone.

Shapes: ``(B, M, *S) -> depthwise (B, M, *S') -> BN -> pointwise (B, N, *S')``, with ``S'`` the
original conv's output size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from darkknowledge.errors import ConfigError

_CONVS: dict[type[nn.Module], tuple[type[nn.Module], type[nn.Module]]] = {
    nn.Conv1d: (nn.Conv1d, nn.BatchNorm1d),
    nn.Conv2d: (nn.Conv2d, nn.BatchNorm2d),
}


def separable_cost_ratio(out_channels: int, kernel_size: int | Sequence[int]) -> float:
    """MobileNets' cost (and weight) ratio of a depthwise-separable to a standard convolution.

    Args:
        out_channels: ``N``, the output channels.
        kernel_size: The kernel (an int for 1-D, or the size per dimension); its number of taps
            is ``D_K^2`` for a ``D_K x D_K`` kernel.

    Returns:
        ``1/N + 1/taps`` (multiply-adds of depthwise + pointwise over those of the standard conv).
    """
    taps = kernel_size if isinstance(kernel_size, int) else math.prod(kernel_size)
    return 1.0 / out_channels + 1.0 / taps


def convertible(module: nn.Module) -> bool:
    """True for an ``nn.Conv1d``/``nn.Conv2d`` with ``groups == 1``, more than one tap and more than
    one input channel (the convolutions that :func:`to_depthwise` factorizes)."""
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d))
        and type(module) in _CONVS
        and module.groups == 1
        and math.prod(module.kernel_size) > 1
        and module.in_channels > 1
    )


class DepthwiseSeparable(nn.Module):
    """Depthwise conv -> BatchNorm -> pointwise 1x1 conv, replacing a standard ``conv``.

    Module paths: ``depthwise`` (``groups = in_channels``, the original kernel, stride, padding,
    dilation and padding mode, no bias), ``bn``, ``pointwise`` (1x1 to ``out_channels``, with a
    bias when the original conv had one). New parameters are on the original conv's device and
    dtype, freshly initialised (PyTorch's defaults), trainable as the original weight was.

    Args:
        conv: The ``nn.Conv1d``/``nn.Conv2d`` to replace (see :func:`convertible`).
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__()
        if not convertible(conv):
            raise ValueError(f"not a convertible convolution: {conv!r}")
        conv_cls, bn_cls = _CONVS[type(conv)]
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        m, n = conv.in_channels, conv.out_channels
        self.depthwise = conv_cls(
            m,
            m,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=m,
            bias=False,
            padding_mode=conv.padding_mode,
            **factory,
        )
        self.bn = bn_cls(m, **factory)
        self.pointwise = conv_cls(m, n, 1, bias=conv.bias is not None, **factory)
        self.requires_grad_(conv.weight.requires_grad)
        self.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, M, *S)`` -> ``(B, N, *S')``, the replaced conv's output shape."""
        h = self.depthwise(x)  # (B, M, *S')
        h = self.bn(h)  # (B, M, *S')
        return self.pointwise(h)  # (B, N, *S')


def to_depthwise(model: nn.Module, where: str = "student") -> list[str]:
    """Make every convertible convolution of ``model`` depthwise-separable, in place.

    A conv shared by several parents (the same module at two paths) is replaced by one shared
    :class:`DepthwiseSeparable` at all of them.

    Args:
        model: Any module (a zoo model, a user's net); changed in place.
        where: Config path for the error (``student``, ``student.ops``).

    Returns:
        The module paths that were replaced, in ``named_modules`` order (each now holds
        ``.depthwise``, ``.bn``, ``.pointwise``).

    Raises:
        ConfigError: ``model`` has no convertible convolution (the message counts the convs it
            has and why each kind was kept), or is itself a bare convolution (it has no parent
            to hold the replacement).

    Example:
        >>> model = create_model("cnn1d", input_shape=(2, 40))
        >>> to_depthwise(model)
        ['blocks.0.0', 'blocks.1.0', 'blocks.2.0']
    """
    if convertible(model):
        raise ConfigError(
            f"{where}: the model is itself a single {type(model).__name__}; put it inside a module "
            "(e.g. nn.Sequential(conv)) so that it can be replaced"
        )
    replacements: dict[int, DepthwiseSeparable] = {}
    replaced: list[str] = []
    for parent_path, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):  # named_children() hides repeats
            if not convertible(child):
                continue
            if id(child) not in replacements:
                replacements[id(child)] = DepthwiseSeparable(child)
            setattr(parent, child_name, replacements[id(child)])
            replaced.append(f"{parent_path}.{child_name}" if parent_path else child_name)
    if not replaced:
        raise ConfigError(
            f"{where}: 'depthwise' has nothing to convert in {type(model).__name__}: "
            f"{_why_none(model)}. It makes nn.Conv1d/nn.Conv2d layers with groups=1, a kernel "
            "of more than one tap and more than one input channel depthwise-separable"
        )
    return replaced


def _why_none(model: nn.Module) -> str:
    """A short account of the model's convolutions, none of which is convertible."""
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        return "it has no convolution"
    grouped = sum(1 for m in convs if m.groups > 1)
    pointwise = sum(1 for m in convs if m.groups == 1 and math.prod(m.kernel_size) == 1)
    single = sum(1 for m in convs if m.groups == 1 and math.prod(m.kernel_size) > 1 and m.in_channels == 1)
    other = len(convs) - grouped - pointwise - single
    parts = [
        f"{grouped} grouped/depthwise",
        f"{pointwise} 1x1",
        f"{single} with one input channel",
        f"{other} of another kind (transposed, 3-D)",
    ]
    return f"its {len(convs)} convolutions are " + ", ".join(p for p in parts if not p.startswith("0 "))
