"""Quantizer modules: a tensor in, its fake-quantized copy out (math in :mod:`.fake_quant`).

* :class:`LsqQuantizer` (``"lsq"``): Esser et al., "Learned Step Size Quantization", ICLR 2020.
  A learned ``step`` parameter, ``(C,)`` per channel or ``(1,)`` per tensor, initialised to
  ``2 <|v|> / sqrt(Q_P)`` from the first tensor the quantizer sees (the weights when a layer is
  converted, the first batch for activations). Two buffers, ``initialized`` and ``signed``, record
  that this happened and which code range was chosen, so a state dict restores them (a resumed
  or reloaded model never re-initialises). An activation quantizer built with ``signed=None``
  picks its range at initialisation: unsigned ``[0, 2^b - 1]`` when the first input is >= 0
  (after a ReLU), signed otherwise. Step gradient scale ``g = 1 / sqrt(N * Q_P)``: ``N`` is the
  number of weights per step, or for activations the features of one sample (``x[0].numel()``).
* :class:`MinMaxQuantizer` (``"minmax"``): Polino, Pascanu, Alistarh, "Model compression via
  distillation and quantization", ICLR 2018, Sec. 2.1. No parameters: the range of each tensor
  (each channel) is read afresh on every call.

Both take ``bits`` in 2..8. Per channel means per index of dim 0 (a weight's output channels);
activation quantizers are per tensor. ``quantize(v)`` returns the integer codes, scale and zero
point of ``v`` (``v_hat = (codes - zero_point) * scale`` exactly equals the forward value).

Under DDP, activation steps are initialised on each rank from its own first batch; run one
forward before wrapping the model (or load a state dict) so every rank starts from the same step.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.registry import Registry
from darkknowledge.students.quant.fake_quant import (
    Quantized,
    check_bits,
    lsq_fake_quant,
    lsq_grad_scale,
    lsq_init_step,
    lsq_quantize,
    minmax_fake_quant,
    minmax_quantize,
    qrange,
)

QUANTIZERS: Registry[type[nn.Module]] = Registry("quantizer")
"""Quantizer classes by method name (``QuantSpec.method``)."""


class WeightQuantizer(Protocol):
    """What every quantizer module provides besides its forward (the module docstring)."""

    bits: int

    def quantize(self, v: torch.Tensor) -> Quantized: ...

    def code_range(self) -> tuple[int, int]: ...


def _check_channels(where: str, per_channel: bool, channels: int, activation: bool) -> int:
    """Validate the per-channel arguments; return the number of steps (1 per tensor)."""
    if per_channel and activation:
        raise ConfigError(f"{where}: activation quantizers are per tensor; got per_channel=True")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ConfigError(f"{where}: channels must be a positive integer, got {channels!r}")
    return channels if per_channel else 1


@QUANTIZERS.register("lsq")
class LsqQuantizer(nn.Module):
    """LSQ fake quantizer with a learned step size.

    Args:
        bits: Bit width, 2..8.
        signed: Code range ``[-2^(b-1), 2^(b-1)-1]`` (True), ``[0, 2^b-1]`` (False), or None to
            choose at initialisation (unsigned iff the first input is >= 0).
        per_channel: One step per index of dim 0 (weights only).
        channels: Size of dim 0 when ``per_channel``.
        activation: Quantizes activations: ``N`` of the gradient scale counts one sample's
            features and the quantizer is per tensor.
        device: Device of the step.
        dtype: Dtype of the step (the layer's).

    Shapes:
        ``(C, ...)`` in (any shape per tensor), same shape out.
    """

    method = "lsq"

    initialized: torch.Tensor  # buffers
    signed: torch.Tensor

    def __init__(
        self,
        bits: int,
        signed: bool | None = True,
        per_channel: bool = False,
        channels: int = 1,
        activation: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits, "LsqQuantizer.bits")
        self.per_channel = bool(per_channel)
        self.activation = bool(activation)
        self.auto_sign = signed is None
        steps = _check_channels("LsqQuantizer", self.per_channel, channels, self.activation)
        self.step = nn.Parameter(torch.ones(steps, device=device, dtype=dtype))  # (C,) or (1,)
        self.register_buffer("initialized", torch.tensor(False, device=device))
        self.register_buffer("signed", torch.tensor(True if signed is None else bool(signed), device=device))
        self._mirror: tuple[bool, bool] | None = None  # (initialized, signed) read once, not per forward

    def _state(self) -> tuple[bool, bool]:
        """``(initialized, signed)`` from the buffers, read from the device only when they may have changed."""
        if self._mirror is None or not self._mirror[0]:
            self._mirror = (bool(self.initialized), bool(self.signed))
        return self._mirror

    def bounds(self) -> tuple[int, int]:
        """``(Q_N, Q_P)`` of the current code range."""
        return qrange(self.bits, self._state()[1])

    def code_range(self) -> tuple[int, int]:
        """Smallest and largest integer code."""
        q_n, q_p = self.bounds()
        return -q_n, q_p

    def is_initialized(self) -> bool:
        """Whether the step was set from data (or loaded)."""
        return self._state()[0]

    def _check(self, v: torch.Tensor) -> None:
        if self.per_channel and (v.dim() == 0 or v.shape[0] != self.step.numel()):
            raise ShapeError(
                f"LsqQuantizer: per-channel steps for {self.step.numel()} channels, got a tensor of shape "
                f"{tuple(v.shape)} (dim 0 must be {self.step.numel()})"
            )

    @torch.no_grad()
    def initialize(self, v: torch.Tensor) -> None:
        """Set the code range (when automatic) and ``step = 2 <|v|> / sqrt(Q_P)`` from ``v``."""
        self._check(v)
        if self.auto_sign:
            self.signed.fill_(bool((v < 0).any()))
        _, q_p = self.bounds()
        self.step.copy_(lsq_init_step(v, q_p, self.per_channel).to(self.step.dtype))
        self.initialized.fill_(True)
        self._mirror = None

    def n_per_step(self, v: torch.Tensor) -> int:
        """``N`` of the gradient scale: weights per step, or one sample's features."""
        if self.activation:
            return v[0].numel() if v.dim() > 1 else v.numel()
        return v.numel() // self.step.numel()

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``v`` (initialising the step on the first call)."""
        self._check(v)
        if not self.is_initialized():
            self.initialize(v)
        q_n, q_p = self.bounds()
        return lsq_fake_quant(v, self.step, q_n, q_p, lsq_grad_scale(self.n_per_step(v), q_p))

    def quantize(self, v: torch.Tensor) -> Quantized:
        """Integer codes, step and zero point (0) of ``v``; initialises the step like ``forward``."""
        self._check(v)
        if not self.is_initialized():
            self.initialize(v)
        q_n, q_p = self.bounds()
        return lsq_quantize(v, self.step, q_n, q_p)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._mirror = None  # re-read the loaded flags

    def extra_repr(self) -> str:
        sign = "signed" if bool(self.signed) else "unsigned"
        sign = f"auto ({sign} once initialized)" if self.auto_sign and not bool(self.initialized) else sign
        return (
            f"bits={self.bits}, {sign}, per_channel={self.per_channel}, steps={self.step.numel()}, "
            f"activation={self.activation}"
        )


@QUANTIZERS.register("minmax")
class MinMaxQuantizer(nn.Module):
    """Min-max (Polino et al.) fake quantizer: ``2^b`` levels spanning each tensor's (channel's) range.

    Args:
        bits: Bit width, 2..8.
        per_channel: A range per index of dim 0 (weights only).
        activation: Quantizes activations (per tensor).

    Shapes:
        ``(C, ...)`` in (any shape per tensor), same shape out.
    """

    method = "minmax"

    def __init__(self, bits: int, per_channel: bool = False, activation: bool = False) -> None:
        super().__init__()
        self.bits = check_bits(bits, "MinMaxQuantizer.bits")
        self.per_channel = bool(per_channel)
        self.activation = bool(activation)
        _check_channels("MinMaxQuantizer", self.per_channel, 1, self.activation)

    def code_range(self) -> tuple[int, int]:
        """Smallest and largest integer code."""
        return 0, 2**self.bits - 1

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``v`` over its current range (straight-through gradient)."""
        return minmax_fake_quant(v, self.bits, self.per_channel)

    def quantize(self, v: torch.Tensor) -> Quantized:
        """Integer codes, scale and (fractional) zero point of ``v``."""
        return minmax_quantize(v, self.bits, self.per_channel)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, activation={self.activation}"


def make_quantizer(
    method: str,
    bits: int,
    per_channel: bool,
    channels: int = 1,
    activation: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build the quantizer of ``method`` for a layer's weights or its input activations.

    Args:
        method: ``"lsq"`` or ``"minmax"`` (a name in :data:`QUANTIZERS`).
        bits: Bit width, 2..8.
        per_channel: Per output channel (weights); ignored for activations (per tensor).
        channels: The weight's dim 0.
        activation: An input-activation quantizer (LSQ: signedness chosen from the first batch).
        device: Device of learned parameters.
        dtype: Dtype of learned parameters.

    Raises:
        RegistryError: Unknown method (with the valid names).
        ConfigError: Bad bit width.
    """
    cls = QUANTIZERS.get(method)
    per_channel = per_channel and not activation
    if cls is LsqQuantizer:
        return LsqQuantizer(
            bits,
            signed=None if activation else True,
            per_channel=per_channel,
            channels=channels,
            activation=activation,
            device=device,
            dtype=dtype,
        )
    return cls(bits, per_channel=per_channel, activation=activation)
