"""Quantized layers: ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Linear`` whose weights (and inputs) are
fake-quantized on every forward.

Each is a subclass of its float layer, so ``isinstance`` checks, the ``weight`` / ``bias``
parameters (and their state-dict keys) and the module's path are unchanged; it adds the
submodules ``weight_quant`` (a quantizer of the weight, per output channel or per tensor) and
``act_quant`` (a quantizer of the input activations, or None for full-precision inputs).
The float weight stays the trained parameter (straight-through / LSQ gradients reach it); the
layer computes with ``weight_quant(weight)``::

    y = conv(act_quant(x), weight_quant(weight)) + bias          # bias in full precision

Quantizers: :mod:`darkknowledge.students.quant.quantizers` (LSQ, Esser et al., ICLR 2020;
min-max, Polino et al., ICLR 2018). Build one from a float layer with ``from_float(module, spec)``.

Shapes: as the float layer (``(B, C_in, L)``, ``(B, C_in, H, W)``, ``(B, *, in_features)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from darkknowledge.errors import ConfigError
from darkknowledge.students.quant.quantizers import make_quantizer
from darkknowledge.students.quant.spec import QuantSpec


class QuantLayer:
    """Mixin of the quantized layers: the quantizers and the conversion from a float layer."""

    FLOAT: type[nn.Module]
    weight: torch.Tensor
    weight_quant: nn.Module
    act_quant: nn.Module | None

    if TYPE_CHECKING:  # the layers built from the mixin take their float layer's arguments and the quantizers'

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    def _attach_quantizers(self, bits: int, act_bits: int | None, method: str, per_channel: bool) -> None:
        """Add ``weight_quant`` and ``act_quant`` (None without ``act_bits``) on the weight's device/dtype."""
        factory: dict[str, Any] = {"device": self.weight.device, "dtype": self.weight.dtype}
        module: nn.Module = self  # type: ignore[assignment]  # a mixin: self is the layer
        module.weight_quant = make_quantizer(method, bits, per_channel, channels=self.weight.shape[0], **factory)
        act = None if act_bits is None else make_quantizer(method, act_bits, False, activation=True, **factory)
        module.register_module("act_quant", act)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight the layer computes with (same shape as ``weight``)."""
        return self.weight_quant(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the layer sees it: fake-quantized, or unchanged without ``act_quant``."""
        return x if self.act_quant is None else self.act_quant(x)

    @classmethod
    def _float_kwargs(cls, module: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_float(cls, module: nn.Module, spec: QuantSpec) -> nn.Module:
        """A quantized copy of a float layer: same hyper-parameters, device, dtype, weights and mode.

        The weight quantizer is initialised from the copied weights (LSQ's step), the activation
        quantizer on the first batch.

        Args:
            module: An ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Linear`` (exactly that type).
            spec: Bits, activation bits, method and per-channel choice.

        Raises:
            ConfigError: ``module`` is not of this layer's float type.
        """
        if type(module) is not cls.FLOAT:
            raise ConfigError(
                f"{cls.__name__}.from_float: expects an nn.{cls.FLOAT.__name__}, got {type(module).__name__}"
            )
        assert isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))  # every FLOAT is one of them
        weight = module.weight
        new = cls(
            **cls._float_kwargs(module),
            bias=module.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
            bits=spec.bits,
            act_bits=spec.act_bits,
            method=spec.method,
            per_channel=spec.per_channel,
        )
        layer = cast("nn.Linear | nn.Conv1d | nn.Conv2d", new)  # cls subclasses its FLOAT
        with torch.no_grad():
            layer.weight.copy_(weight)
            if module.bias is not None and layer.bias is not None:
                layer.bias.copy_(module.bias)
        initialize = getattr(new.weight_quant, "initialize", None)
        if initialize is not None:
            initialize(layer.weight.detach())
        layer.weight.requires_grad_(weight.requires_grad)
        if module.bias is not None and layer.bias is not None:
            layer.bias.requires_grad_(module.bias.requires_grad)
        return layer.train(module.training)


def _conv_kwargs(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a float convolution, bias/device/dtype excluded."""
    return {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": module.kernel_size,
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "groups": module.groups,
        "padding_mode": module.padding_mode,
    }


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` with fake-quantized weight ``(out, in)`` (per output row) and optional input.

    Args:
        in_features: As ``nn.Linear``.
        out_features: As ``nn.Linear``.
        bias: As ``nn.Linear``.
        device: As ``nn.Linear``.
        dtype: As ``nn.Linear``.
        bits: Weight bit width, 2..8.
        act_bits: Input bit width, or None for full-precision inputs.
        method: ``"lsq"`` or ``"minmax"``.
        per_channel: One weight step per output feature.
    """

    FLOAT = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bits: int = 8,
        act_bits: int | None = None,
        method: str = "lsq",
        per_channel: bool = True,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach_quantizers(bits, act_bits, method, per_channel)

    @classmethod
    def _float_kwargs(cls, module: nn.Module) -> dict[str, Any]:
        return {"in_features": module.in_features, "out_features": module.out_features}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *, in_features)`` -> ``(B, *, out_features)``."""
        return nn.functional.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class _QuantConv(QuantLayer):
    """What the quantized convolutions share: their float class's constructor, then the
    quantizers; ``from_float`` copies the convolution's hyper-parameters; the forward pass
    convolves the quantized input with the quantized weight (bias in full precision)."""

    def __init__(
        self,
        *args: Any,
        bits: int = 8,
        act_bits: int | None = None,
        method: str = "lsq",
        per_channel: bool = True,
        **kwargs: Any,
    ) -> None:
        self.FLOAT.__init__(self, *args, **kwargs)  # type: ignore[arg-type]  # a mixin: self is the FLOAT's subclass
        self._attach_quantizers(bits, act_bits, method, per_channel)

    @classmethod
    def _float_kwargs(cls, module: nn.Module) -> dict[str, Any]:
        return _conv_kwargs(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *S)`` -> ``(B, C_out, *S')``."""
        # the convolution's method:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)  # type: ignore[attr-defined]


class QuantConv1d(_QuantConv, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight ``(C_out, C_in/groups, k)`` and optional input.

    Args:
        *args: ``nn.Conv1d``'s arguments.
        bits: Weight bit width, 2..8.
        act_bits: Input bit width, or None for full-precision inputs.
        method: ``"lsq"`` or ``"minmax"``.
        per_channel: One weight step per output channel.
        **kwargs: ``nn.Conv1d``'s keyword arguments.
    """

    FLOAT = nn.Conv1d


class QuantConv2d(_QuantConv, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight ``(C_out, C_in/groups, kh, kw)`` and optional input.

    Args:
        *args: ``nn.Conv2d``'s arguments.
        bits: Weight bit width, 2..8.
        act_bits: Input bit width, or None for full-precision inputs.
        method: ``"lsq"`` or ``"minmax"``.
        per_channel: One weight step per output channel.
        **kwargs: ``nn.Conv2d``'s keyword arguments.
    """

    FLOAT = nn.Conv2d


QUANT_LAYERS: dict[str, type[QuantLayer]] = {"Conv1d": QuantConv1d, "Conv2d": QuantConv2d, "Linear": QuantLinear}
"""The quantized twin of each quantizable type name (``QuantSpec.modules``)."""
