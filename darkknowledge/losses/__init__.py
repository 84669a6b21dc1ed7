"""Loss terms: a registry of :class:`DistillLoss` classes, one file per method."""

from __future__ import annotations

from typing import Any

from darkknowledge.losses.base import DistillLoss, Needs, Outputs, SetupInfo
from darkknowledge.registry import Registry
from darkknowledge.validation import validate_kwargs

LOSSES: Registry[type[DistillLoss]] = Registry("loss")


def register_loss(name: str):  # noqa: ANN201 - decorator
    """Register a :class:`DistillLoss` subclass under ``name``."""

    def decorator(cls: type[DistillLoss]) -> type[DistillLoss]:
        cls.registry_name = name
        return LOSSES.register(name)(cls)

    return decorator


def create_loss(name: str, where: str | None = None, **params: Any) -> DistillLoss:
    """Build the loss registered as ``name``; params are checked against its signature.

    Args:
        name: Registry name, e.g. ``"kd"``.
        where: Config path for error messages (default ``losses.<name>``).
        **params: The loss's own parameters (e.g. ``T=4.0``).
    """
    cls = LOSSES.get(name)
    checked = validate_kwargs(cls, params, where=where or f"losses.{name}")
    return cls(**checked)


def list_losses() -> list[str]:
    """Names of all registered losses."""
    return LOSSES.names()


def _import_methods() -> None:
    """Import every method module in this package so that each registers itself."""
    import importlib
    import pkgutil

    infrastructure = {"base", "objective", "adapters", "feature", "scalar"}
    for info in pkgutil.iter_modules(__path__):
        if info.name not in infrastructure and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_methods()

__all__ = ["LOSSES", "DistillLoss", "Needs", "Outputs", "SetupInfo", "create_loss", "list_losses", "register_loss"]
