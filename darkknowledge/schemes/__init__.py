"""Distillation schemes: who teaches whom, as plans. One file per scheme; each registers itself."""

from __future__ import annotations

from darkknowledge.discovery import import_modules
from darkknowledge.schemes.base import SCHEMES, Scheme, SchemeParams, register_scheme, resolve_scheme
from darkknowledge.schemes.context import Context

import_modules(__name__, __path__)

__all__ = ["SCHEMES", "Context", "Scheme", "SchemeParams", "register_scheme", "resolve_scheme"]
