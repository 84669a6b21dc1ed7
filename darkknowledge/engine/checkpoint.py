"""Checkpoints: atomic writes, safe loading (``weights_only=True``), RNG state, weight hashes.

A training checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it
loads with ``torch.load(..., weights_only=True)`` and never unpickles code.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from darkknowledge.atomic import atomic_write
from darkknowledge.errors import CheckpointError

FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (see :mod:`darkknowledge.atomic`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; unreadable files raise ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from None


def state_hash(module_or_state: nn.Module | dict[str, torch.Tensor]) -> str:
    """A sha256 (16 hex chars) over parameter/buffer names, shapes, dtypes and values."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(state[name].shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def capture_rng() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy and Python, in a weights_only-safe form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(obj: Any) -> Any:
    return [_to_lists(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuples(obj: Any) -> Any:
    return tuple(_to_tuples(o) for o in obj) if isinstance(obj, list) else obj


def export_model(model: nn.Module, path: str | Path, spec: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Save a model alone: its weights plus the spec that rebuilds it (``{"name", "params"}``).

    Load it back with :func:`load_exported` (or ``dk eval``).
    """
    payload = {
        "format": FORMAT_VERSION,
        "kind": "model",
        "spec": spec,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "hash": state_hash(model),
        **(extra or {}),
    }
    return atomic_save(payload, path)


def read_export(path: str | Path) -> dict[str, Any]:
    """The whole payload of a file written by :func:`export_model` (spec, state_dict, extras)."""
    payload = safe_load(path)
    if payload.get("kind") != "model":
        raise CheckpointError(
            f"{str(path)!r} is not an exported model (kind={payload.get('kind')!r}); "
            "export one with darkknowledge.engine.checkpoint.export_model or `dk distill`"
        )
    return payload


def load_exported(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return ``(spec, state_dict)`` of a file written by :func:`export_model`."""
    payload = read_export(path)
    return payload["spec"], payload["state_dict"]
