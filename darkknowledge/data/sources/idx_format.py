"""The IDX format used by MNIST and Fashion-MNIST (optionally gzip-compressed): reader and writer."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np

from darkknowledge.data.sources.common import DataFormatError

IDX_DTYPES: dict[int, str] = {
    0x08: "u1",  # unsigned byte
    0x09: "i1",  # signed byte
    0x0B: ">i2",  # short, big-endian
    0x0C: ">i4",  # int, big-endian
    0x0D: ">f4",  # float, big-endian
    0x0E: ">f8",  # double, big-endian
}
"""Type byte of the IDX magic number -> numpy dtype."""


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file into a native-byte-order numpy array.

    The header is a big-endian magic number ``0x0000 <type> <ndim>`` followed by ``ndim``
    big-endian uint32 dimension sizes; the data follows in C order. A ``.gz`` suffix means
    gzip compression.

    Args:
        path: The ``.idx``-style file, e.g. ``train-images-idx3-ubyte[.gz]``.

    Raises:
        DataFormatError: Bad magic number, unknown type, or a size mismatch.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataFormatError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataFormatError(f"{path} is not an IDX file (magic number must start with two zero bytes)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in IDX_DTYPES:
        raise DataFormatError(f"{path}: unknown IDX type byte 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[type_code])
    count = math.prod(dims)
    if len(raw) - header != count * dtype.itemsize:
        raise DataFormatError(
            f"{path}: header says {dims} x {dtype.itemsize} bytes, file holds {len(raw) - header} data bytes"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)  # writable, native order


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``uint8`` ``array`` as IDX (magic ``0x0000 0x08 <ndim>``, big-endian uint32 dims, the
    bytes in C order), gzip-compressed when ``path`` ends in ``.gz``."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
