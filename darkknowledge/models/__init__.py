"""The model zoo: build a model by name, list names, find its feature taps.

Every zoo model's ``forward(x)`` returns logits ``(B, num_classes)`` only; intermediate
features are taken with forward hooks on the module paths its ``feature_taps()`` lists
(stage outputs, shallow to deep). In every zoo model the classifier is the module ``fc``,
so ``"fc:input"`` (the input of ``fc``) is always the penultimate feature.

Example:
    >>> model = create_model("resnet20", num_classes=100, input_shape=(3, 32, 32))
    >>> default_taps(model)
    ['layer1', 'layer2', 'layer3']
    >>> model.dk_name, model.dk_params
    ('resnet20', {'num_classes': 100, 'input_shape': [3, 32, 32]})
"""

from __future__ import annotations

import fnmatch
from typing import Any

from torch import nn

from darkknowledge.discovery import import_modules
from darkknowledge.errors import ConfigError
from darkknowledge.models._common import to_jsonable
from darkknowledge.models._registry import MODELS, register_model
from darkknowledge.validation import validate_kwargs

__all__ = ["MODELS", "count_params", "create_model", "default_taps", "list_models", "register_model"]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name.

    ``torchvision:NAME``, ``timm:NAME`` and ``hf:FOLDER_OR_MODEL_TYPE`` (a ``transformers``
    classifier) come from those libraries (optional); any other name is looked up in ``MODELS``
    and its kwargs are checked against the builder's signature first. The model gets ``dk_name``
    (the name) and ``dk_params`` (the kwargs as plain JSON data), so
    ``create_model(m.dk_name, **m.dk_params)`` rebuilds it.

    Args:
        name: Registered name (see ``list_models()``) or ``"torchvision:NAME"`` / ``"timm:NAME"`` /
            ``"hf:FOLDER_OR_MODEL_TYPE"``.
        **kwargs: Builder parameters; the framework passes ``num_classes`` and ``input_shape``.

    Raises:
        RegistryError: Unknown name (the message lists close names).
        ConfigError: Unknown parameter, wrong type or bad value, or a missing optional library.
    """
    if ":" in name:
        from darkknowledge.models.external import create_external

        source, _, ext_name = name.partition(":")
        model = create_external(source, ext_name, **kwargs)
    else:
        builder = MODELS.get(name)
        checked = validate_kwargs(builder, kwargs, where=f"model {name!r}")
        model = builder(**checked)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model {name!r}: the builder returned {type(model).__name__}, not an nn.Module")
        kwargs = checked
    model.dk_name = name  # type: ignore[assignment]  # a plain attribute (__setattr__ is typed for tensors, modules)
    model.dk_params = to_jsonable(dict(kwargs))
    return model


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted, optionally filtered by an fnmatch pattern (``"resnet*"``).

    Args:
        pattern: Shell-style pattern, case-sensitive; None lists all.
    """
    names = MODELS.names()
    if pattern is None:
        return names
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """Strip DataParallel/DDP (``.module``) and torch.compile (``._orig_mod``) wrappers.

    Returns:
        The inner model and the path prefix of the inner model inside ``model``.
    """
    prefix = ""
    while True:
        wrapped = None
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            wrapped, attr = model.module, "module"
        elif "_orig_mod" in model._modules:
            wrapped, attr = model._modules["_orig_mod"], "_orig_mod"
        if not isinstance(wrapped, nn.Module):
            return model, prefix
        model, prefix = wrapped, f"{prefix}{attr}."


def default_taps(model: nn.Module) -> list[str]:
    """The model's ``feature_taps()``, or ``[]`` when it has none.

    For a model wrapped in DataParallel / DistributedDataParallel (``.module``) or by
    ``torch.compile`` (``._orig_mod``) the inner model's taps are returned with the wrapper's
    prefix (``"module.layer1"``), so every path resolves in ``model.named_modules()`` of the
    object passed in.

    Args:
        model: A model, possibly wrapped.
    """
    inner, prefix = _unwrap(model)
    fn = getattr(inner, "feature_taps", None)
    if not callable(fn):
        return []
    return [prefix + tap for tap in fn()]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once).

    Args:
        model: Any module.
        trainable_only: Count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


import_modules(__name__, __path__)  # every zoo file registers its builders
