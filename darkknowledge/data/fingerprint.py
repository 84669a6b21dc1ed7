"""Short content hashes that identify a dataset (name, parameters and data bytes)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

FINGERPRINT_CHARS = 16
"""Hex characters kept from the sha256 digest (64 bits)."""


def _jsonable(value: Any) -> Any:
    """Make ``value`` JSON-serialisable in a stable way."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def hash_params(params: Mapping[str, Any]) -> str:
    """Short sha256 of a parameter mapping (key order does not matter)."""
    text = json.dumps(_jsonable(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_CHARS]


def update_with_tensor(h: Any, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and raw bytes into the hash object ``h``."""
    array = np.ascontiguousarray(tensor.detach().cpu().numpy())
    h.update(f"{array.dtype.str}{tuple(array.shape)}".encode())
    h.update(array.reshape(-1).view(np.uint8).data)


def fingerprint(
    name: str,
    params: Mapping[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor]] = (),
) -> str:
    """Identity hash of a dataset.

    Args:
        name: Registered dataset name.
        params: Every parameter that shapes the data (defaults included).
        tensors: ``(label, tensor)`` pairs whose bytes belong to the identity, e.g.
            ``("train.x", x)``; changing one byte changes the fingerprint.

    Returns:
        The first ``FINGERPRINT_CHARS`` hex characters of a sha256 digest.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"name": name, "params": _jsonable(params)}, sort_keys=True).encode())
    for label, tensor in tensors:
        h.update(label.encode())
        update_with_tensor(h, tensor)
    return h.hexdigest()[:FINGERPRINT_CHARS]
