"""One discovery rule for every registry: a package's modules register themselves on import.

Losses, schemes, models, dataset sources and teachers each live one per file in a package;
importing the package imports every module in it whose name does not start with ``_`` (so a
new file is picked up without touching any list). Shared helpers that register nothing are
harmless to import; private helpers start with ``_``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def import_modules(package: str, path: Iterable[str]) -> list[str]:
    """Import every public module of ``package`` (its ``__path__`` is ``path``), sorted by name.

    Args:
        package: The package's dotted name (``__name__`` in its ``__init__``).
        path: The package's ``__path__``.

    Returns:
        The imported module names.
    """
    names = sorted(info.name for info in pkgutil.iter_modules(list(path)) if not info.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
