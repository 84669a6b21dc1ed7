"""Loss terms: a registry of :class:`DistillLoss` classes, one file per method."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from darkknowledge.discovery import import_modules
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import DistillLoss, Needs, Outputs, SetupInfo
from darkknowledge.registry import Registry
from darkknowledge.validation import validate_kwargs

LOSSES: Registry[type[DistillLoss]] = Registry("loss")
LossT = TypeVar("LossT", bound=DistillLoss)


def register_loss(name: str) -> Callable[[type[LossT]], type[LossT]]:
    """Register a :class:`DistillLoss` subclass under ``name``."""

    def decorator(cls: type[LossT]) -> type[LossT]:
        cls.registry_name = name
        LOSSES.register(name)(cls)
        return cls

    return decorator


def create_loss(name: str, where: str | None = None, **params: Any) -> DistillLoss:
    """Build the loss registered as ``name``; params are checked against its signature.

    Args:
        name: Registry name, e.g. ``"kd"``.
        where: Config path for error messages (default ``losses.<name>``).
        **params: The loss's own parameters (e.g. ``T=4.0``).
    """
    cls = LOSSES.get(name)
    where = where or f"losses.{name}"
    for old, new in cls.renamed.items():
        if old in params:
            raise ConfigError(
                f"{where}.{old}: renamed to {new!r} (every loss calls its temperature T); write {new}: {params[old]!r}"
            )
    checked = validate_kwargs(cls, params, where=where)
    return cls(**checked)


def list_losses() -> list[str]:
    """Names of all registered losses."""
    return LOSSES.names()


import_modules(__name__, __path__)  # every method file registers itself

__all__ = ["LOSSES", "DistillLoss", "Needs", "Outputs", "SetupInfo", "create_loss", "list_losses", "register_loss"]
