"""Atomic file writes: a temp file in the same folder, fsync, then one ``os.replace``.

A crash or kill leaves either the old file or the new one, never half a file; concurrent
writers are safe (the last one wins and every version is whole). Files get the permissions a
plain ``open()`` would give them under the user's umask (``tempfile.mkstemp`` alone makes
them ``0600``: readable by their owner only). A full disk or a folder that cannot be written
is one :class:`WriteError` that says so, and the previous version of the file stays intact.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from darkknowledge.errors import DarkKnowledgeError

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}


class WriteError(DarkKnowledgeError, OSError):
    """A file could not be written: the disk is full, or the folder is not writable."""


def _read_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # elsewhere the only way to read it is to set it (briefly) and put it back
    os.umask(old)
    return old


@functools.lru_cache(maxsize=1)
def file_mode() -> int:
    """Permission bits of a new file: ``0o666`` without the umask's bits (read once per process)."""
    return 0o666 & ~_read_umask()


def atomic_write(path: str | Path, write: Callable[[IO[Any]], object], binary: bool = True) -> Path:
    """Call ``write(f)`` on a temp file next to ``path`` and rename it over ``path``.

    Args:
        path: Destination; its parent folder is created.
        write: Writes the content to the open file object.
        binary: Open the temp file in binary (default) or text mode.

    Returns:
        ``path``.

    Raises:
        WriteError: No space left on the device (or quota exceeded), or the folder is not
            writable; ``path`` keeps its previous content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, file_mode())
        else:  # pragma: no cover - Windows has no fchmod
            os.chmod(tmp, file_mode())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        converted = _write_error(path, exc)
        if converted is exc:
            raise
        raise converted from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_error(path: Path, exc: OSError) -> OSError:
    """``exc`` as a :class:`WriteError` when it means a full disk or a folder we may not write."""
    if isinstance(exc, WriteError):
        return exc
    if exc.errno in _NO_SPACE:
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        return WriteError(
            f"cannot write {str(path)!r}: no space left on the device ({free}); its previous version, if any, is "
            "intact. Free some space (or point --out / DK_CACHE at another disk) and continue with --resume."
        )
    if exc.errno in _NOT_ALLOWED or isinstance(exc, (NotADirectoryError, FileExistsError)):
        return WriteError(
            f"cannot write {str(path)!r}: {exc.strerror or exc}. Choose a folder you can write "
            "(--out DIR, or DK_CACHE for caches)."
        )
    return exc
