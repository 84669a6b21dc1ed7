"""One writer per run folder: an exclusive lock on ``<run>/.lock``.

The lock is an OS file lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) held for as
long as the run's :class:`~darkknowledge.runs.session.Session` lives. The OS drops it when the
process ends, however it ends (``kill -9`` included), so a lock left by a killed process is
stale by construction: the next writer takes it without any clean-up. The file itself stays
and holds the holder's pid, command and start time, for the message a second writer gets.

The lock belongs to the process: a process that already holds a folder's lock (say a Python
API call that resumes after an exception in the same interpreter) may open that folder again;
the lock is released when the last of its holders in the process is released (or collected).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import weakref
from pathlib import Path
from typing import IO, Any

from darkknowledge.errors import DarkKnowledgeError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # no fcntl on Windows
    import msvcrt

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"

# resolved folder -> [open lock file, holders in this process]
_HELD: dict[str, list[Any]] = {}


class RunFolderBusyError(DarkKnowledgeError):
    """Another process is writing the run folder."""


def _try_lock(f: IO[str]) -> bool:
    """Take the exclusive lock on ``f`` without waiting; False when another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _unlock(f: IO[str]) -> None:
    try:
        f.seek(0)
        f.truncate()  # the holder's details are stale from now on
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        else:  # pragma: no cover - Windows
            msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
    except OSError as exc:  # closing the file below releases it in any case
        log.debug("unlocking %s: %s", f.name, exc)
    finally:
        f.close()


def _release(key: str) -> None:
    entry = _HELD.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _HELD[key]
        _unlock(entry[0])


def holder(folder: str | Path) -> dict[str, Any]:
    """What the lock file of ``folder`` says about its last holder (``{}`` when nothing readable)."""
    try:
        data = json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """The exclusive lock of one run folder, taken by :meth:`acquire`.

    Args:
        folder: The run folder (created when missing).
        command: What holds it, for the message a second writer gets (e.g. ``dk distill tiny``).
    """

    def __init__(self, folder: str | Path, command: str) -> None:
        self.folder = Path(folder)
        self.command = command
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunFolderBusyError` naming the process that holds it.

        Raises:
            RunFolderBusyError: Another process holds the lock.
            OSError: The folder or its lock file cannot be created.
        """
        if self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = str(self.folder.resolve())
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            f = open(self.folder / LOCK_NAME, "a+", encoding="utf-8")  # held open while the run lives
            if not _try_lock(f):
                f.close()
                raise RunFolderBusyError(self._busy_message())
            f.seek(0)
            f.truncate()
            json.dump(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "command": self.command,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                },
                f,
            )
            f.flush()
            _HELD[key] = [f, 1]
        self._finalizer = weakref.finalize(self, _release, key)
        return self

    def release(self) -> None:
        """Release this holder's share of the lock (the lock itself goes with the last one)."""
        if self._finalizer is not None:
            self._finalizer()

    def _busy_message(self) -> str:
        info = holder(self.folder)
        who = f"pid {info['pid']}" if "pid" in info else "another process"
        if info.get("host") and info["host"] != socket.gethostname():
            who += f" on {info['host']}"
        details = ", ".join(
            str(v) for v in (info.get("command"), info.get("started") and f"started {info['started']}") if v
        )
        return (
            f"run folder {str(self.folder)!r} is in use by {who}{f' ({details})' if details else ''}; "
            "two runs writing one folder would mix their results. Wait for it to finish, or choose "
            "another --out."
        )

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
