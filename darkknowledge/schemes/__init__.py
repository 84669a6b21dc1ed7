"""Distillation schemes: who teaches whom. One engine trains every scheme; one file per scheme."""

from __future__ import annotations

from darkknowledge.schemes.base import SCHEMES, Scheme
from darkknowledge.schemes.context import SchemeContext
from darkknowledge.schemes.offline import Offline


def register_scheme(name: str):  # noqa: ANN201 - decorator
    """Register a :class:`Scheme` subclass under ``name``."""

    def decorator(cls: type[Scheme]) -> type[Scheme]:
        cls.registry_name = name
        return SCHEMES.register(name)(cls)

    return decorator


def _import_schemes() -> None:
    """Import every scheme module in this package so that each registers itself."""
    import importlib
    import pkgutil

    infrastructure = {"base", "context"}
    for info in pkgutil.iter_modules(__path__):
        if info.name not in infrastructure and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_schemes()

__all__ = ["SCHEMES", "Offline", "Scheme", "SchemeContext", "register_scheme"]
