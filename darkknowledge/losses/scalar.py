"""Constant factors of hot-loop losses as 0-d tensors, made once.

``logits * 0.25`` wraps the Python float into a new tensor on every call (a dtype conversion
and a copy), which costs about as much as the multiply itself on small logits (a few µs on a
CPU). Multiplying by a 0-d tensor made once costs half as much and gives the same values. A
0-d CPU tensor multiplies tensors on any device (a CPU scalar operand needs no copy and no
host sync), and its dtype does not change the result's (``fp16 * 0-d fp32 -> fp16``).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=512)
def scalar(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 0-d CPU tensor ``value`` of ``dtype``, the same object on every call.

    Made outside inference mode, so autograd may save it for backward whatever mode the
    first caller was in. Never modify it in place.

    Args:
        value: The constant.
        dtype: Its dtype; pass the operand's dtype for float64 math (a float32 constant
            would round ``value`` to float32 precision).
    """
    with torch.inference_mode(False):
        return torch.tensor(value, dtype=dtype)


def scalar_for(value: float, like: torch.Tensor) -> torch.Tensor:
    """:func:`scalar` with float64's precision for float64 operands, float32 otherwise."""
    return scalar(value, torch.float64 if like.dtype == torch.float64 else torch.float32)
