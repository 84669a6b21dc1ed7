"""YAML reading for recipes and overrides: YAML 1.1 as PyYAML reads it, numbers as YAML 1.2 reads them.

PyYAML implements YAML 1.1, whose float pattern needs a dot: ``1e-3`` and ``5E4`` come back
as the *strings* ``"1e-3"`` and ``"5E4"``. Every ML recipe writes learning rates that way, and a
string where a number belongs fails far from the recipe (or, in a free-form mapping such as a
loss's or a scheme's params, is taken as text). :func:`load_yaml` reads them as floats, like
YAML 1.2 and JSON do; everything else is exactly ``yaml.safe_load`` (no Python objects).
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` plus YAML 1.2's exponent floats without a dot (``1e-3``, ``-2E+4``)."""


_Loader.add_implicit_resolver(  # appended after SafeLoader's resolvers: ints and dotted floats keep their rules
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse ``text`` like ``yaml.safe_load``, reading ``1e-3``-style numbers as floats.

    Args:
        text: A YAML document.

    Returns:
        The parsed value (None for an empty document).

    Raises:
        yaml.YAMLError: ``text`` is not valid YAML, or holds a value PyYAML cannot build (a date
            such as ``2001-13-45``, ``!!int x``, nesting too deep to parse).
    """
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no Python objects
    except yaml.YAMLError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, KeyError, AttributeError) as exc:
        # PyYAML's constructors raise plain Python errors for some values; the caller gets one kind
        raise yaml.constructor.ConstructorError(None, None, f"cannot read a value: {exc}") from None


__all__ = ["load_yaml"]
