"""Fake quantization: the math of two uniform quantizers, as pure functions on tensors.

A fake-quantized tensor holds only values of a b-bit grid, ``v_hat = (q - z) * s`` with integer
codes ``q``, a step (scale) ``s`` and a zero point ``z``, but is stored and computed in floating
point, so a layer trains with the rounding it will meet at inference. Both quantizers work per
tensor (one ``s``) or per channel (one ``s`` per index of dim 0: a weight's output channels).
Steps and zero points have shape ``(C,)`` per channel or ``(1,)`` per tensor;
:func:`channel_view` broadcasts them against a ``(C, ...)`` tensor.

**LSQ** (``lsq_*``): Esser, McKinstry, Bablani, Appuswamy, Modha, "Learned Step Size
Quantization", ICLR 2020 (arXiv:1902.08153), Sec. 2::

    v_bar = round(clip(v / s, -Q_N, Q_P))                                   (Eq. 1)
    v_hat = v_bar * s                                                       (Eq. 2)
    d v_hat / d s = -v/s + round(v/s)   if -Q_N < v/s < Q_P                 (Eq. 3)
                  = -Q_N                if v/s <= -Q_N
                  = Q_P                 if v/s >= Q_P
    d v_hat / d v = 1 inside (-Q_N, Q_P), 0 outside  (straight-through round)    (Eq. 5)

signed codes: ``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1``; unsigned: ``Q_N = 0``, ``Q_P = 2^b - 1``.
The step's gradient is multiplied by ``g = 1 / sqrt(N * Q_P)`` (Sec. 2.2, chosen so the step's
update ratio R of Eq. 4 is near that of the weights), ``N = N_W`` weights per step size, or
``N_F`` features of the layer for an activation quantizer; ``s`` starts at ``2 <|v|> / sqrt(Q_P)``
on the initial weights or the first batch of activations. Both are applied with the
"grad_scale" and "round_pass" tricks of the paper's appendix, written here so that the forward
value is exactly the grid value (``x.detach() + (f(x) - f(x).detach())`` adds an exact 0).
At exactly ``v/s = Q_P`` (or ``-Q_N``) the clamp passes the gradient, so Eq. 3's inside branch
(value 0) applies there; the paper's boundary cases are measure-zero.

**Min-max** (``minmax_*``): Polino, Pascanu, Alistarh, "Model compression via distillation and
quantization", ICLR 2018, Sec. 2.1: the scaling function ``sc(v) = (v - beta) / alpha`` with
``alpha = max(v) - min(v)``, ``beta = min(v)`` per bucket (here per tensor or per channel) maps
``v`` to ``[0, 1]``, which is rounded to the nearest of ``2^b`` equally spaced points
(``L = 2^b - 1`` intervals, as the official code's ``s - 1``), then scaled back::

    q = round(sc(v) * L)                 in {0, ..., L}
    v_hat = sc^{-1}(q / L) = (q - z) * s  with s = alpha / L, z = -beta / s

``alpha < 1e-10`` (a constant bucket) is set to 1, as in the official code. The zero point is
fractional (``beta`` is not snapped to the grid). Gradients are straight-through: the gradient
w.r.t. ``v_hat`` is the gradient w.r.t. ``v`` (quantized distillation applies the quantized
model's gradient to the full-precision weights); ``alpha`` and ``beta`` get none.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from darkknowledge.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 8
MIN_STEP = 1e-8
"""Floor of an initial LSQ step (an all-zero channel would otherwise give s = 0)."""
ALPHA_TOL = 1e-10
"""Polino's ``tol_diff_zero``: a bucket whose range is below it gets ``alpha = 1``."""


class Quantized(NamedTuple):
    """Integer codes of a tensor and how to read them back: ``v_hat = (codes - zero_point) * scale``.

    Attributes:
        codes: Integer values (a float tensor), the shape of the quantized tensor.
        scale: Step size, ``(C,)`` per channel (dim 0) or ``(1,)`` per tensor.
        zero_point: The code of real 0, shaped as ``scale`` (0 for LSQ; fractional for min-max).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor


def check_bits(bits: object, where: str = "bits") -> int:
    """Return ``bits`` when it is an int in 2..8.

    Raises:
        ConfigError: Anything else, naming the value and the valid range.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{where}: bit width must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)``: codes run over ``[-Q_N, Q_P]`` (LSQ, Sec. 2).

    Args:
        bits: Bit width, 2..8.
        signed: ``[-2^(b-1), 2^(b-1) - 1]`` when True, ``[0, 2^b - 1]`` when False.
    """
    check_bits(bits)
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(C,)`` or ``(1,)`` step to ``(C, 1, ..., 1)`` so it broadcasts over ``like``."""
    return t.reshape(-1, *([1] * (like.dim() - 1))) if like.dim() > 1 else t


def _reduce_dims(v: torch.Tensor, per_channel: bool) -> list[int]:
    """Dims averaged (or min/max-ed) over: all but dim 0 per channel, all per tensor."""
    return list(range(1, v.dim())) if per_channel else list(range(v.dim()))


def _per_step(stat: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """A reduced statistic as a ``(C,)`` (per channel) or ``(1,)`` (per tensor) vector."""
    return stat.reshape(-1) if per_channel else stat.reshape(1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator; LSQ's round_pass)."""
    return x.round().detach() + (x - x.detach())  # value: round(x) + 0 exactly


def scale_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``g`` backward (LSQ's grad_scale)."""
    scaled = x * g
    return x.detach() + (scaled - scaled.detach())  # value: x + 0 exactly


def lsq_grad_scale(n_per_step: int, q_p: int) -> float:
    """LSQ's step-size gradient scale ``g = 1 / sqrt(N * Q_P)`` (Sec. 2.2).

    Args:
        n_per_step: ``N_W`` (weights sharing one step) or ``N_F`` (features of the layer).
        q_p: The positive code bound ``Q_P``.
    """
    return 1.0 / math.sqrt(max(n_per_step, 1) * q_p)


def lsq_init_step(v: torch.Tensor, q_p: int, per_channel: bool) -> torch.Tensor:
    """LSQ's initial step ``2 <|v|> / sqrt(Q_P)`` (floored at 1e-8).

    Args:
        v: Weights ``(C, ...)`` or a batch of activations.
        q_p: The positive code bound ``Q_P``.
        per_channel: One step per index of dim 0 (mean over the other dims) or one for all.

    Returns:
        ``(C,)`` per channel or ``(1,)`` per tensor.
    """
    v = v.detach()
    mean_abs = v.abs().mean(dim=_reduce_dims(v, per_channel)) if v.dim() else v.abs()  # (C,) or ()
    return _per_step(2.0 * mean_abs / math.sqrt(q_p), per_channel).clamp_min(MIN_STEP)


def lsq_fake_quant(v: torch.Tensor, step: torch.Tensor, q_n: int, q_p: int, grad_scale: float = 1.0) -> torch.Tensor:
    """LSQ forward ``round(clip(v / s, -Q_N, Q_P)) * s`` (Eqs. 1-2) with the gradients of Eqs. 3 and 5.

    Args:
        v: Tensor to quantize, ``(C, ...)`` when ``step`` is per channel.
        step: ``(C,)`` or ``(1,)`` learned step sizes.
        q_n: ``Q_N`` (codes go down to ``-Q_N``).
        q_p: ``Q_P``.
        grad_scale: ``g``, multiplies the step's gradient.

    Returns:
        The fake-quantized tensor, shape of ``v``.
    """
    s = channel_view(scale_grad(step, grad_scale), v)  # (C, 1, ..., 1)
    return round_ste(torch.clamp(v / s, -q_n, q_p)) * s


def lsq_quantize(v: torch.Tensor, step: torch.Tensor, q_n: int, q_p: int) -> Quantized:
    """LSQ's integer codes ``round(clip(v / s, -Q_N, Q_P))`` (Eq. 1), step and zero point 0 (no grad)."""
    with torch.no_grad():
        s = channel_view(step.detach(), v)
        codes = torch.clamp(v.detach() / s, -q_n, q_p).round()
        return Quantized(codes, step.detach().clone(), torch.zeros_like(step.detach()))


def minmax_quantize(v: torch.Tensor, bits: int, per_channel: bool) -> Quantized:
    """Polino et al.'s min-max codes ``round((v - beta) / alpha * (2^b - 1))`` (Sec. 2.1; no grad).

    Args:
        v: Tensor to quantize, ``(C, ...)`` per channel.
        bits: Bit width: ``2^b`` levels, codes ``0 .. 2^b - 1``.
        per_channel: One ``(alpha, beta)`` per index of dim 0, or one for the whole tensor.

    Returns:
        Codes, ``scale = alpha / (2^b - 1)`` and ``zero_point = -beta / scale``, each ``(C,)`` or ``(1,)``.
    """
    levels = 2 ** check_bits(bits) - 1
    with torch.no_grad():
        v = v.detach()
        dims = _reduce_dims(v, per_channel)
        lo = v.amin(dim=dims) if v.dim() else v  # (C,) or ()
        alpha = (v.amax(dim=dims) if v.dim() else v) - lo
        alpha = torch.where(alpha < ALPHA_TOL, torch.ones_like(alpha), alpha)
        lo, alpha = _per_step(lo, per_channel), _per_step(alpha, per_channel)
        codes = ((v - channel_view(lo, v)) / channel_view(alpha, v) * levels).round().clamp(0, levels)
        scale = alpha / levels
        return Quantized(codes, scale, -lo / scale)


def dequantize(q: Quantized) -> torch.Tensor:
    """``(codes - zero_point) * scale``, per channel along dim 0 of the codes."""
    return (q.codes - channel_view(q.zero_point, q.codes)) * channel_view(q.scale, q.codes)


def minmax_fake_quant(v: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """Min-max fake quantization (Polino et al., Sec. 2.1) with a straight-through gradient.

    Args:
        v: Tensor to quantize, ``(C, ...)`` per channel.
        bits: Bit width, 2..8.
        per_channel: Ranges per index of dim 0, or one range for the tensor.

    Returns:
        ``(q - z) * s``, shape of ``v``; its gradient w.r.t. ``v`` is the identity.
    """
    return dequantize(minmax_quantize(v, bits, per_channel)) + (v - v.detach())
