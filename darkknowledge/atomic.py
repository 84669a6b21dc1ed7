"""Atomic file writes: a temp file in the same folder, fsync, then one ``os.replace``.

A crash or kill leaves either the old file or the new one, never half a file; concurrent
writers are safe (the last one wins and every version is whole).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], binary: bool = True) -> Path:
    """Call ``write(f)`` on a temp file next to ``path`` and rename it over ``path``.

    Args:
        path: Destination; its parent folder is created.
        write: Writes the content to the open file object.
        binary: Open the temp file in binary (default) or text mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
