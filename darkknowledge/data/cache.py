"""Where darkknowledge keeps downloaded and generated data, and atomic writes into it."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from darkknowledge.atomic import atomic_write

logger = logging.getLogger(__name__)

CACHE_ENV = "DK_CACHE"
"""Environment variable that overrides the cache directory."""


def cache_dir() -> Path:
    """Return the darkknowledge cache directory (not created here).

    ``$DK_CACHE`` when set, else ``~/.cache/darkknowledge``.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "darkknowledge"


def data_dir() -> Path:
    """``cache_dir() / "data"``: generated arrays and the default dataset root."""
    return cache_dir() / "data"


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` as ``.npz`` so that readers never see a partial file.

    The arrays go to a temporary file in the same directory, which then replaces ``path``
    in one ``os.replace`` (atomic on POSIX and Windows). Concurrent writers are safe: the
    last one wins and every version is complete.

    Args:
        path: Destination file; its parent directory is created.
        **arrays: Named arrays to store.
    """
    atomic_write(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]  # numpy's stubs: a name may be allow_pickle


def load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """Read ``keys`` from the ``.npz`` at ``path``; None when missing or unreadable.

    A corrupt or incomplete cache file is logged and treated as a cache miss.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in keys}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        logger.warning("ignoring unreadable cache file %s (%s); regenerating", path, exc)
        return None
