"""Errors raised on bad user input, each naming the bad value and what would be valid."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DarkKnowledgeError(Exception):
    """Base class of every error darkknowledge raises on purpose."""


class ConfigError(DarkKnowledgeError, ValueError):
    """A config value is unknown, of the wrong type, or out of range."""


class RegistryError(DarkKnowledgeError, KeyError):
    """A name was looked up in a registry that does not hold it."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class TapError(DarkKnowledgeError, ValueError):
    """A feature-tap path does not name a module of the model, or its capture failed."""


class ShapeError(DarkKnowledgeError, ValueError):
    """Teacher and student outputs do not fit together."""


class CheckpointError(DarkKnowledgeError, RuntimeError):
    """A checkpoint cannot be read or does not belong to this run."""


class DivergenceError(DarkKnowledgeError, FloatingPointError):
    """Training diverged: a loss, gradient or weight became NaN or infinite."""


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` candidates closest to ``name`` (best first).

    Args:
        name: The misspelled or unknown name.
        candidates: The valid names.
        n: How many matches at most.
    """
    candidates = list(candidates)
    matches = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not matches:  # fall back to substring hits, e.g. "layer3" -> "layer3.0", "layer3.1"
        matches = [c for c in candidates if name and (name in c or c in name)][:n]
    return matches


def did_you_mean(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """A ' Did you mean ...?' suffix for an error message, or '' when nothing is close."""
    matches = close_matches(name, candidates, n=n)
    if not matches:
        return ""
    return " Did you mean " + ", ".join(repr(m) for m in matches) + "?"
