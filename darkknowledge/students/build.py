"""A student spec's derivations, in order: shrink the family, convert its operations, quantize.

A model spec (``student:`` or any model section) names a zoo family and may ask for

* ``width`` / ``depth``: the family rebuilt with fewer channels / blocks per stage
  (:func:`darkknowledge.students.shrink.shrink_spec`): a *simplified* student;
* ``ops: depthwise``: every ``k > 1`` convolution made depthwise-separable
  (:func:`darkknowledge.students.depthwise.to_depthwise`): a student with *efficient operations*;
* ``quantize: {...}``: fake-quantized weights and activations (:mod:`darkknowledge.students.quant`):
  a *quantized* student.

Shrinking yields another registered spec (``name``, ``params``), so an exported model records
the shrunk family's own spec plus ``ops`` and ``quantize``, and rebuilds from that alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from darkknowledge.errors import ConfigError

OPS_ATTR = "dk_ops"
"""Attribute naming the operations conversion a built model went through (absent: plain)."""
QUANT_ATTR = "dk_quantize"
"""Attribute holding the validated quantization spec (a dict) of a built model (absent: float)."""


def resolved_family(
    name: str, params: Mapping[str, Any], width: float = 1.0, depth: float = 1.0, where: str = "student"
) -> tuple[str, dict[str, Any]]:
    """The registered ``(name, params)`` a spec builds: itself, or its family shrunk.

    Raises:
        ConfigError: The family has no shrink rule or the multipliers leave nothing to build.
    """
    if width == 1.0 and depth == 1.0:
        return name, dict(params)
    from darkknowledge.students.shrink import shrink_spec

    return shrink_spec(name, dict(params), width=width, depth=depth, where=where)


def quant_spec(quantize: Mapping[str, Any], where: str = "student.quantize") -> Any:
    """``quantize:`` validated into a :class:`~darkknowledge.students.quant.QuantSpec` (errors name ``where``)."""
    from darkknowledge.students.quant.wrap import as_spec

    return as_spec(quantize, where)


def convert(
    model: nn.Module, ops: str = "plain", quantize: Mapping[str, Any] | None = None, where: str = "student"
) -> nn.Module:
    """Apply ``ops`` then ``quantize`` to a freshly built ``model`` in place and mark it.

    Args:
        model: A zoo (or any) model, freshly built.
        ops: ``plain`` (nothing) or ``depthwise``.
        quantize: A :class:`QuantSpec` mapping, or None for a float model.
        where: Config path for errors.

    Returns:
        ``model`` (converted in place), with ``dk_ops`` / ``dk_quantize`` set when converted.

    Raises:
        ConfigError: An unknown ``ops``, nothing to convert, or a bad quantization spec.
    """
    if ops == "depthwise":
        from darkknowledge.students.depthwise import to_depthwise

        to_depthwise(model, where=f"{where}.ops")
        setattr(model, OPS_ATTR, ops)
    elif ops != "plain":
        raise ConfigError(f"{where}.ops: {ops!r} is not an operations conversion; valid: 'plain', 'depthwise'")
    if quantize is not None:
        from darkknowledge.students.quant import quantize_model

        spec = quant_spec(quantize, f"{where}.quantize")
        quantize_model(model, spec, where=f"{where}.quantize")
        setattr(model, QUANT_ATTR, spec.model_dump(mode="json"))
    return model


def derivation(model: nn.Module) -> dict[str, Any]:
    """The conversions a built model records for its export spec: ``{"ops", "quantize"}`` as set."""
    out: dict[str, Any] = {}
    ops = getattr(model, OPS_ATTR, "plain")
    if ops != "plain":
        out["ops"] = ops
    quantize = getattr(model, QUANT_ATTR, None)
    if quantize is not None:
        out["quantize"] = dict(quantize)
    return out
