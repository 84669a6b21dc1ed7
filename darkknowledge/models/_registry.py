"""The model registry: every zoo builder registers itself here by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from darkknowledge.registry import Registry

MODELS: Registry[Callable[..., Any]] = Registry("model")
"""Name -> builder function (or ``nn.Module`` class) for every registered model."""


def register_model(name: str | None = None, *, overwrite: bool = False) -> Callable[[Any], Any]:
    """Decorator that registers a model builder under ``name`` (same as ``MODELS.register``).

    A builder takes typed keyword parameters with defaults and must accept ``num_classes: int``
    and ``input_shape: tuple[int, ...]`` (per-sample shape, no batch dim); the framework fills
    both from the dataset. It returns an ``nn.Module`` whose ``forward(x)`` gives logits
    ``(B, num_classes)`` and which ideally defines ``feature_taps() -> list[str]``.

    Args:
        name: Registry key (default: the builder's ``__name__``).
        overwrite: Allow replacing an existing entry.

    Example:
        >>> @register_model("tiny")
        ... def tiny(num_classes: int = 10, input_shape: tuple[int, ...] = (40,)) -> nn.Module:
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(40, num_classes))
    """
    return MODELS.register(name, overwrite=overwrite)
