"""Quantize a model in place: swap its conv/linear layers for their fake-quantized twins.

``quantize_model(model, spec)`` replaces the layers a :class:`QuantSpec` selects by
:class:`~darkknowledge.students.quant.layers.QuantConv1d` / ``QuantConv2d`` / ``QuantLinear``
(subclasses of the float layers, at the same module paths, with the same weights), so feature
taps, ``isinstance`` checks and state-dict keys of weights and biases are unchanged.

Selection (``named_modules()`` order): every module whose type is exactly one of
``spec.modules`` (``torch.nn.Conv1d``, ``Conv2d``, ``Linear``; subclasses such as attention's
``out_proj`` are left alone), minus the first one (``keep_first``) and the last one
(``keep_last``); or, when ``spec.paths`` is given, exactly those paths.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic
from torch import nn

from darkknowledge.errors import ConfigError, close_matches
from darkknowledge.students.quant.layers import QUANT_LAYERS, QuantLayer
from darkknowledge.students.quant.spec import QUANTIZABLE_TYPES, QuantSpec
from darkknowledge.taps import unwrap
from darkknowledge.validation import format_validation_error

log = logging.getLogger(__name__)

_FLOAT_TYPES: dict[type[nn.Module], str] = {layer.FLOAT: name for name, layer in QUANT_LAYERS.items()}


def _type_name(module: nn.Module) -> str | None:
    """``"Conv1d"`` / ``"Conv2d"`` / ``"Linear"`` for exactly those float classes, else None."""
    return _FLOAT_TYPES.get(type(module))


def quantizable_paths(model: nn.Module, types: Sequence[str] = QUANTIZABLE_TYPES) -> list[str]:
    """Paths of the float layers of ``types`` (exact ``torch.nn`` classes), in ``named_modules()`` order.

    The root module itself is never listed: it cannot be swapped in place.
    """
    return [p for p, m in unwrap(model).named_modules() if p and _type_name(m) in types]


def as_spec(spec: QuantSpec | Mapping[str, Any], where: str = "student.quantize") -> QuantSpec:
    """A :class:`QuantSpec`, validating a plain mapping.

    Raises:
        ConfigError: An unknown key or bad value, named with its path under ``where``.
    """
    if isinstance(spec, QuantSpec):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping such as {{bits: 4}}, got {type(spec).__name__}")
    try:
        return QuantSpec(**dict(spec))
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def _listing(paths: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(p) for p in paths[:limit])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > limit else "") if paths else "(none)"


def select_paths(model: nn.Module, spec: QuantSpec, where: str = "student.quantize") -> list[str]:
    """The module paths ``spec`` quantizes in ``model`` (see the module docstring).

    Raises:
        ConfigError: A path that names no module or no quantizable float layer, or an empty selection.
    """
    net = unwrap(model)
    name = type(net).__name__
    candidates = quantizable_paths(net)
    if spec.paths is not None:
        modules = dict(net.named_modules())
        for path in spec.paths:
            if path not in modules:
                hint = close_matches(path, candidates, n=4) or candidates
                raise ConfigError(f"{where}.paths: {name} has no module {path!r}; quantizable paths: {_listing(hint)}")
            if not path or _type_name(modules[path]) is None:
                raise ConfigError(
                    f"{where}.paths: {path!r} is a {type(modules[path]).__name__}, not a float (non-root) "
                    f"{'/'.join(QUANTIZABLE_TYPES)} layer; quantizable paths: {_listing(candidates)}"
                )
        chosen = list(dict.fromkeys(spec.paths))
        if not chosen:
            raise ConfigError(f"{where}.paths: empty, nothing to quantize; quantizable paths: {_listing(candidates)}")
        return chosen
    typed = quantizable_paths(net, spec.modules)
    if not typed:
        raise ConfigError(
            f"{where}.modules: {name} has no {', '.join(spec.modules)} layer to quantize; its quantizable "
            f"layers: {_listing([f'{p} ({_type_name(net.get_submodule(p))})' for p in candidates])}"
        )
    chosen = typed[1 if spec.keep_first else 0 : len(typed) - 1 if spec.keep_last else len(typed)]
    if not chosen:
        kept = [flag for flag, on in (("keep_first", spec.keep_first), ("keep_last", spec.keep_last)) if on]
        raise ConfigError(
            f"{where}: nothing to quantize: {name}'s only {'/'.join(spec.modules)} layers {_listing(typed)} "
            f"are kept in full precision by {' and '.join(kept)}; set {kept[0]}: false or list paths"
        )
    return chosen


def quantize_model(model: nn.Module, spec: QuantSpec | Mapping[str, Any], where: str = "student.quantize") -> list[str]:
    """Swap the selected layers of ``model`` for fake-quantized ones, in place.

    Args:
        model: Any module (DDP/compile wrappers are looked through); not already quantized.
        spec: A :class:`QuantSpec` or a mapping of its fields.
        where: Config path for errors.

    Returns:
        The quantized module paths, in ``named_modules()`` order.

    Raises:
        ConfigError: A bad spec, an unknown or non-quantizable path, nothing to quantize, or a
            model that already holds quantized layers.
    """
    spec = as_spec(spec, where)
    net = unwrap(model)
    if is_quantized(net):
        raise ConfigError(f"{where}: {type(net).__name__} is already quantized ({_listing(list(quant_summary(net)))})")
    chosen = select_paths(net, spec, where)
    for path in chosen:
        old = net.get_submodule(path)
        # select_paths: quantizable types only:
        new = QUANT_LAYERS[_type_name(old)].from_float(old, spec)  # type: ignore[index]
        parent_path, _, child = path.rpartition(".")
        setattr(net.get_submodule(parent_path) if parent_path else net, child, new)
    log.info(
        "quantized %d layer(s) of %s to %d-bit weights (%s activations, %s): %s",
        len(chosen),
        type(net).__name__,
        spec.bits,
        "full-precision" if spec.act_bits is None else f"{spec.act_bits}-bit",
        spec.method,
        ", ".join(chosen),
    )
    return chosen


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds at least one fake-quantized layer."""
    return any(isinstance(m, QuantLayer) for m in unwrap(model).modules())


def quant_summary(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per quantized module path: ``{"bits", "act_bits", "method", "per_channel"}`` (empty for a float model)."""
    out: dict[str, dict[str, Any]] = {}
    for path, m in unwrap(model).named_modules():
        if isinstance(m, QuantLayer):
            out[path] = {
                "bits": m.weight_quant.bits,
                "act_bits": None if m.act_quant is None else m.act_quant.bits,
                "method": m.weight_quant.method,
                "per_channel": m.weight_quant.per_channel,
            }
    return out
