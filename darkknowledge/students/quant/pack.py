"""Real low-bit storage: a model's integer weight codes packed densely into bytes.

Fake-quantized layers compute in floating point; what a deployed model stores is each weight's
integer codes plus its scales. :func:`packed_state_dict` builds that state dict (every tensor a
plain CPU tensor, ready for ``safetensors``), :func:`unpack_state_dict` reads it back into the
dequantized weights (equal to the fake-quantized ones, bit for bit in float32), and
:func:`quantized_nbytes` is the size of its ``safetensors`` file.

A packed weight, under its state-dict key ``K`` (e.g. ``"blocks.0.0.weight"``), becomes::

    K.q_codes       uint8 (ceil(n * b / 8),)  codes minus the smallest code (so 0 .. 2^b - 1),
                    b bits each, as one little-endian bit stream: code i holds bits
                    i*b .. i*b + b - 1, counted from bit 0 of byte 0. So 2-bit: 4 codes a
                    byte (the first in the low bits), 4-bit: 2 a byte, 8-bit: one byte each;
                    3, 5, 6 and 7 bits are bit-packed (a code may straddle two bytes)
    K.q_scale       float32 (C,) per output channel or (1,) per tensor
    K.q_zero_point  float32, as q_scale; absent when all zero (LSQ)
    K.q_meta        int64 (2 + dim,): [bits, smallest code, *weight shape]
                    (smallest code: -2^(b-1) for LSQ's signed weights, 0 for min-max)

    weight = (codes - zero_point) * scale     (per channel along dim 0)

Which weights are packed: those of quantized layers at their own bits. In a float model (no
quantized layer) with ``default_bits`` set, every ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Linear``
weight is min-max quantized per output channel to ``default_bits`` (Polino et al., ICLR 2018,
Sec. 2.1): the size of the float model after post-training quantization. The full-precision
layers of a quantized model (``keep_first`` / ``keep_last``) stay float32, as they were
evaluated. Every other tensor is kept: floating ones as float32, others (counters, flags) as they are.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
from torch import nn

from darkknowledge.errors import CheckpointError, ConfigError
from darkknowledge.students.quant.fake_quant import (
    Quantized,
    check_bits,
    dequantize,
    minmax_quantize,
)
from darkknowledge.students.quant.layers import QuantLayer
from darkknowledge.students.quant.quantizers import WeightQuantizer
from darkknowledge.students.quant.wrap import is_quantized
from darkknowledge.taps import unwrap

CODES, SCALE, ZERO_POINT, META = ".q_codes", ".q_scale", ".q_zero_point", ".q_meta"
_SUFFIXES = (CODES, SCALE, ZERO_POINT, META)
_CHUNK = 1 << 18  # codes per packing step (a multiple of 8: every chunk ends on a byte boundary)
_FLOAT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


class IntegerWeights(NamedTuple):
    """A quantized layer's weight as integers: ``weight_hat = (codes - zero_point) * scale``.

    Attributes:
        codes: ``int8`` when every code fits (LSQ signed, min-max up to 7 bits), else ``int16``;
            the weight's shape.
        scale: ``(C,)`` per output channel or ``(1,)``.
        zero_point: As ``scale``; 0 for LSQ, fractional for min-max.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor


def _weight_quantizer(layer: QuantLayer) -> WeightQuantizer:
    """The layer's weight quantizer, by the interface every quantizer has."""
    return cast(WeightQuantizer, layer.weight_quant)


def integer_weights(layer: nn.Module | QuantLayer) -> IntegerWeights:
    """The integer codes, scale and zero point of a quantized layer's weight.

    Raises:
        ConfigError: ``layer`` is not a quantized layer.
    """
    if not isinstance(layer, QuantLayer):
        raise ConfigError(
            f"integer_weights: expects a quantized layer (QuantConv1d, QuantConv2d, QuantLinear), "
            f"got {type(layer).__name__}; quantize the model first (quantize_model)"
        )
    q = _weight_quantizer(layer).quantize(layer.weight)
    lo, hi = _weight_quantizer(layer).code_range()
    dtype = torch.int8 if lo >= -128 and hi <= 127 else torch.int16
    return IntegerWeights(q.codes.to(dtype), q.scale, q.zero_point)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes into a little-endian bit stream of bytes.

    Args:
        codes: Integers in ``[0, 2^bits)``, any shape (read flattened).
        bits: Bit width, 2..8.

    Returns:
        ``uint8`` ``(ceil(n * bits / 8),)`` on the CPU.

    Raises:
        ConfigError: A bad bit width or a code outside ``[0, 2^bits)``.
    """
    check_bits(bits, "pack_codes.bits")
    u = codes.detach().reshape(-1).to("cpu", torch.int64)  # (n,)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2**bits):
        raise ConfigError(
            f"pack_codes: codes must lie in [0, {2**bits - 1}] for {bits} bits, got [{int(u.min())}, {int(u.max())}]"
        )
    if bits == 8:
        return u.to(torch.uint8)
    shifts, byte_bits = torch.arange(bits), 1 << torch.arange(8)
    parts = []
    for start in range(0, u.numel(), _CHUNK):
        stream = ((u[start : start + _CHUNK, None] >> shifts) & 1).reshape(-1)  # (m * bits,) low bit first
        stream = nn.functional.pad(stream, (0, (-stream.numel()) % 8))  # the last chunk fills its byte
        parts.append((stream.view(-1, 8) * byte_bits).sum(1).to(torch.uint8))  # (m * bits / 8,)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as ``int64`` ``(count,)``.

    Raises:
        CheckpointError: ``packed`` holds fewer than ``count`` codes.
    """
    check_bits(bits, "unpack_codes.bits")
    if packed.dtype != torch.uint8 or packed.numel() * 8 < count * bits:
        raise CheckpointError(
            f"unpack_codes: {count} codes of {bits} bits need {(count * bits + 7) // 8} uint8 bytes, "
            f"got {packed.numel()} of {packed.dtype}"
        )
    data = packed.reshape(-1).to("cpu", torch.int64)
    if bits == 8:
        return data[:count].clone()
    shifts, code_bits = torch.arange(8), 1 << torch.arange(bits)
    step = _CHUNK * bits // 8  # bytes of one chunk of codes
    parts = []
    for start in range(0, data.numel(), step):
        stream = ((data[start : start + step, None] >> shifts) & 1).reshape(-1)  # (8 m,) low bit first
        n = stream.numel() // bits
        parts.append((stream[: n * bits].view(n, bits) * code_bits).sum(1))  # (n,)
    out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    return out[:count]


def _plain(t: torch.Tensor) -> torch.Tensor:
    """An own contiguous CPU copy; floating tensors as float32."""
    dtype = torch.float32 if t.is_floating_point() else t.dtype
    return t.detach().to("cpu", dtype).clone(memory_format=torch.contiguous_format)


def _packed_entries(key: str, q: Quantized, bits: int, lo: int) -> dict[str, torch.Tensor]:
    """The ``K.q_*`` tensors of one weight (see the module docstring)."""
    codes = q.codes.detach().to("cpu", torch.int64) - lo  # (C, ...) in [0, 2^b)
    out = {
        key + CODES: pack_codes(codes, bits),
        key + SCALE: _plain(q.scale).reshape(-1),
    }
    if bool((q.zero_point != 0).any()):
        out[key + ZERO_POINT] = _plain(q.zero_point).reshape(-1)
    out[key + META] = torch.tensor([bits, lo, *q.codes.shape], dtype=torch.int64)
    return out


def packed_state_dict(model: nn.Module, default_bits: int | None = 8) -> dict[str, torch.Tensor]:
    """The model's state dict with weights stored as densely packed integer codes.

    Args:
        model: A quantized or float model (DDP/compile wrappers are looked through).
        default_bits: Bits of a float model's conv/linear weights (min-max, per output channel);
            None keeps a float model in float32. Not used for a quantized model.

    Returns:
        ``{key: tensor}``, every tensor on the CPU, contiguous and owning its memory; packed
        weights as ``K.q_*`` entries (module docstring), in the state dict's order.

    Raises:
        ConfigError: ``default_bits`` outside 2..8.
    """
    net = unwrap(model)
    if default_bits is not None:
        check_bits(default_bits, "default_bits")
    quantized = is_quantized(net)
    packed: dict[str, tuple[Quantized, int, int]] = {}
    for path, m in net.named_modules():
        key = f"{path}.weight" if path else "weight"
        if isinstance(m, QuantLayer):
            w = integer_weights(m)
            quantizer = _weight_quantizer(m)
            lo, _ = quantizer.code_range()
            packed[key] = (Quantized(w.codes, w.scale, w.zero_point), quantizer.bits, lo)
        elif not quantized and default_bits is not None and isinstance(m, _FLOAT_LAYERS):
            packed[key] = (minmax_quantize(m.weight, default_bits, per_channel=True), default_bits, 0)
    out: dict[str, torch.Tensor] = {}
    for key, t in net.state_dict().items():
        if key in packed:
            out.update(_packed_entries(key, *packed[key]))
        else:
            out[key] = _plain(t)
    return out


def _entry(packed: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in packed:
        raise CheckpointError(f"packed state dict: {key!r} is missing (it belongs to {key.rsplit('.q_', 1)[0]!r})")
    return packed[key]


def unpack_state_dict(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dequantize a :func:`packed_state_dict`: a state dict loadable into the model it came from.

    Each packed weight becomes ``(codes - zero_point) * scale`` in float32 (equal to the layer's
    fake-quantized weight); every other entry is returned as stored.

    Raises:
        CheckpointError: A packed weight with missing or inconsistent entries.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in packed.items():
        if not key.endswith(_SUFFIXES):
            out[key] = t
            continue
        if not key.endswith(CODES):
            continue
        base = key[: -len(CODES)]
        meta = [int(v) for v in _entry(packed, base + META).tolist()]
        if len(meta) < 2:
            raise CheckpointError(
                f"packed state dict: {base + META!r} holds {meta}, expected [bits, smallest code, *shape]"
            )
        bits, lo, shape = meta[0], meta[1], meta[2:]
        count = 1
        for d in shape:
            count *= d
        codes = (unpack_codes(t, bits, count) + lo).to(torch.float32).reshape(shape)  # (C, ...)
        scale = _entry(packed, base + SCALE).to(torch.float32)
        zero_point = packed.get(base + ZERO_POINT, torch.zeros_like(scale)).to(torch.float32)
        if scale.numel() not in (1, shape[0] if shape else 1) or zero_point.shape != scale.shape:
            raise CheckpointError(
                f"packed state dict: {base!r} has {scale.numel()} scales and {zero_point.numel()} zero points "
                f"for a weight of shape {tuple(shape)} (expected 1 or {shape[0] if shape else 1} of each)"
            )
        out[base] = dequantize(Quantized(codes, scale, zero_point))
    return out


def quantized_nbytes(model: nn.Module, default_bits: int | None = 8) -> int:
    """Bytes of ``safetensors.torch.save(packed_state_dict(model, default_bits))``.

    Raises:
        ModuleNotFoundError: ``safetensors`` is not installed.
    """
    try:
        from safetensors.torch import save
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "quantized_nbytes measures the safetensors file of the packed weights: pip install safetensors"
        ) from exc
    return len(save(packed_state_dict(model, default_bits)))
