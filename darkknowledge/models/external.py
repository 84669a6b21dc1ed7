"""Models from torchvision, timm and Hugging Face ``transformers``: ``torchvision:NAME``,
``timm:NAME``, ``hf:FOLDER_OR_MODEL_TYPE``.

The libraries are optional: they are imported only when such a model is asked for, and a
missing one raises a ``ConfigError`` that says what to install. The returned models get the
same ``dk_name`` / ``dk_params`` attributes as zoo models and a best-effort ``feature_taps()``.
A torchvision or timm model's ``forward`` returns logits ``(B, num_classes)``; a ``transformers``
model's returns a ``ModelOutput`` with ``.logits`` (see :mod:`darkknowledge.models.hf_classification`).
Pretrained weights are the libraries' own: ``weights=`` (torchvision, e.g. ``"DEFAULT"``),
``pretrained=`` (timm), a saved folder (``hf:``); without them the weights are random.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from torch import nn

from darkknowledge.errors import ConfigError, did_you_mean
from darkknowledge.models._common import to_jsonable
from darkknowledge.validation import validate_kwargs

EXTRAS: dict[str, str] = {"torchvision": "vision", "timm": "timm"}
"""Source -> the ``darkknowledge[...]`` extra that installs it."""

SOURCES = (*EXTRAS, "hf")
"""Every model source a ``SOURCE:NAME`` model name may use."""

_SEQUENTIAL_CONTAINERS = ("stages", "features", "blocks", "encoder.layers", "layers")


def _import_source(source: str, full_name: str) -> ModuleType:
    """Import ``source`` or raise a ConfigError naming the extra to install."""
    try:
        return importlib.import_module(source)
    except ImportError:
        extra = EXTRAS[source]
        raise ConfigError(
            f"model {full_name!r} needs the optional package {source!r}, which is not installed. "
            f'Install it with: pip install "darkknowledge[{extra}]"'
        ) from None


def _fixed_taps(taps: tuple[str, ...]) -> list[str]:
    """Return a copy of ``taps`` (bound with functools.partial so the model stays picklable)."""
    return list(taps)


def guess_feature_taps(model: nn.Module) -> list[str]:
    """Best-effort stage-output paths of a torchvision / timm model, shallow to deep.

    Tries, in order: timm's ``feature_info`` list, ResNet-style ``layer1``..``layer4``, then
    the children of a ``stages`` / ``features`` / ``blocks`` / ``encoder.layers`` / ``layers``
    container. Returns ``[]`` when nothing fits.

    Args:
        model: The built model.
    """
    modules = dict(model.named_modules())
    info = getattr(model, "feature_info", None)
    if isinstance(info, list):
        named = [f.get("module") for f in info if isinstance(f, Mapping)]
        taps = [t for t in named if isinstance(t, str) and t in modules]
        if taps:
            return taps
    layers = [f"layer{i}" for i in range(1, 5) if f"layer{i}" in modules]
    if layers:
        return layers
    for container in _SEQUENTIAL_CONTAINERS:
        parent = modules.get(container)
        if parent is not None:
            children = [f"{container}.{child}" for child, _ in parent.named_children()]
            if children:
                return children
    return []


def _build_torchvision(tv: ModuleType, name: str, full_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``torchvision.models.get_model(name, weights=..., **kwargs)`` with clear errors."""
    known = list(tv.models.list_models())
    if name not in known:
        raise ConfigError(
            f"unknown model {full_name!r}.{did_you_mean(name, known)} See torchvision.models.list_models()."
        )
    weights = kwargs.pop("weights", None)
    try:
        return tv.models.get_model(name, weights=weights, **kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"model {full_name!r}: {exc}") from None


def _build_timm(timm: ModuleType, name: str, full_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, pretrained=..., **kwargs)`` with clear errors."""
    if not timm.is_model(name):
        known = list(timm.list_models())
        raise ConfigError(f"unknown model {full_name!r}.{did_you_mean(name, known)} See timm.list_models().")
    pretrained = bool(kwargs.pop("pretrained", False))
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"model {full_name!r}: {exc}") from None


def create_external(source: str, name: str, **kwargs: Any) -> nn.Module:
    """Build a torchvision, timm or ``transformers`` (``hf``) model.

    ``hf`` models are built by :func:`~darkknowledge.models.hf_classification.create_hf_classifier`
    (its parameters are checked). For torchvision and timm, ``input_shape`` is not passed on
    (for timm a non-3 channel count becomes ``in_chans``); every other keyword goes to
    ``torchvision.models.get_model`` (``weights=`` e.g. ``"DEFAULT"``) or ``timm.create_model``
    (``pretrained=``).

    Args:
        source: ``"torchvision"``, ``"timm"`` or ``"hf"``.
        name: The library's model name, e.g. ``"resnet18"``; for ``hf`` a folder or a model type.
        **kwargs: ``num_classes``, ``input_shape`` and library-specific options.

    Returns:
        The model, with ``dk_name = "source:name"``, ``dk_params`` and ``feature_taps()`` set.

    Raises:
        ConfigError: Unknown source or model, bad options, or the library is not installed.
    """
    full_name = f"{source}:{name}"
    if source not in SOURCES:
        raise ConfigError(
            f"unknown model source {source!r} in {full_name!r}.{did_you_mean(source, SOURCES)} "
            f"Valid sources: {', '.join(SOURCES)}."
        )
    params = dict(kwargs)
    if source == "hf":
        from darkknowledge.models.hf_classification import create_hf_classifier

        checked = validate_kwargs(create_hf_classifier, kwargs, where=f"model {full_name!r}", exclude=("name",))
        model = create_hf_classifier(name, **checked)
        model.dk_name = full_name  # type: ignore[assignment]  # a plain attribute (__setattr__ is typed for tensors, modules)
        model.dk_params = to_jsonable(params)
        return model
    lib_kwargs = dict(kwargs)
    input_shape = lib_kwargs.pop("input_shape", None)
    lib = _import_source(source, full_name)
    if source == "torchvision":
        model = _build_torchvision(lib, name, full_name, lib_kwargs)
    else:
        if input_shape is not None and len(input_shape) == 3 and input_shape[0] != 3:
            lib_kwargs.setdefault("in_chans", int(input_shape[0]))
        model = _build_timm(lib, name, full_name, lib_kwargs)
    # plain attributes (nn.Module's __setattr__ is typed for tensors and modules only)
    model.feature_taps = functools.partial(_fixed_taps, tuple(guess_feature_taps(model)))  # type: ignore[assignment]
    model.dk_name = full_name  # type: ignore[assignment]
    model.dk_params = to_jsonable(params)
    return model
