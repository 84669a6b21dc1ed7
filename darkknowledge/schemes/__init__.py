"""Distillation schemes: who teaches whom. One engine trains every scheme."""

from darkknowledge.schemes.base import SCHEMES, Scheme
from darkknowledge.schemes.offline import Offline

__all__ = ["SCHEMES", "Offline", "Scheme"]
