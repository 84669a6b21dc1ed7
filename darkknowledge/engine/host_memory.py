"""Keep freed host memory inside the process while training on the CPU (glibc only).

glibc's ``malloc`` gives large blocks back to the operating system as soon as they are free:
blocks above the ``mmap`` threshold are unmapped, and free space at the top of the heap above
the trim threshold is released. A CPU training step frees its activations at the end and
allocates the same sizes again in the next step, so each step faults the same pages back in,
zero-filled by the kernel. A live teacher run on several batches at once (its activations are
megabytes) paid about 15,000 page faults per epoch of setting (b) in ``benchmarks/speed.py``
and ran 20-40% slower than with the memory kept.

:func:`retain_freed_host_memory` raises both thresholds (``mallopt``), the in-process
equivalent of PyTorch's CPU tuning advice to run under jemalloc or tcmalloc. It is
process-wide and lasts until exit: freed memory, up to the trim threshold, stays reserved
for the next allocation instead of returning to the system. The engine applies it on CPU
runs unless ``train.keep_host_memory`` is false.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling on 64-bit systems (4 MiB * sizeof(long))

_applied: tuple[int, int] | None = None


def retain_freed_host_memory(trim_mb: int = 256, mmap_mb: int = 32) -> bool:
    """Set glibc's trim and ``mmap`` thresholds (once per process; later calls do nothing).

    Args:
        trim_mb: Free memory kept at the top of the heap before any is released.
        mmap_mb: Allocations at least this large get their own mapping (at most 32).

    Returns:
        True when the thresholds are set (now or before); False where the C library is not
        glibc (macOS, Windows, musl) or refused the values.
    """
    global _applied
    if _applied is not None:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has no such symbol
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_bytes, trim_bytes = min(mmap_mb * 2**20, MAX_MMAP_THRESHOLD), trim_mb * 2**20
    # the mmap threshold first: setting either one turns off glibc's dynamic adjustment of both
    if not (mallopt(M_MMAP_THRESHOLD, mmap_bytes) and mallopt(M_TRIM_THRESHOLD, trim_bytes)):
        log.debug("mallopt refused the thresholds (mmap %d, trim %d bytes)", mmap_bytes, trim_bytes)
        return False
    _applied = (mmap_bytes, trim_bytes)
    log.debug("host memory: freed blocks below %d MiB stay in the process (trim threshold %d MiB)", mmap_mb, trim_mb)
    return True
