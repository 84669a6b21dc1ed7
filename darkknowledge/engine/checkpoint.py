"""Checkpoints: atomic writes, safe loading (``weights_only=True``), RNG state, weight hashes.

A training checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it
loads with ``torch.load(..., weights_only=True)`` and never unpickles code. A file that cannot
be read that way (damaged, truncated, not a torch file, or holding other Python objects) raises
one ``CheckpointError`` that names the file and what to delete; torch's own advice to load
it with ``weights_only=False`` (which would run code from the file) is never passed on.

An exported model (:func:`export_model`) is checked on reading: its spec, its weights, and
(:func:`check_export_fits`) the data it was trained for against the data it is used on.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from darkknowledge.atomic import atomic_write
from darkknowledge.errors import CheckpointError
from darkknowledge.validation import weights_problem

FORMAT_VERSION = 1

STAGE_FILES = ("last.pt", "best.pt", "model.pt")
"""The files the engine writes in a stage folder of a run."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (see :mod:`darkknowledge.atomic`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def restart_hint(path: str | Path) -> str:
    """What to delete to start over without the unreadable file ``path``."""
    path = Path(path)
    if path.name in STAGE_FILES:
        return (
            f"Delete the folder {str(path.parent)!r} to train stage {path.parent.name!r} again from the start "
            "(--resume keeps the run's other stages)."
        )
    return f"Delete or replace {str(path)!r} (recreate it with `dk train` or `dk distill`)."


def _unreadable_reason(exc: BaseException) -> str:
    """Why torch could not read a file, in a few words (never torch's advice to unpickle it)."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text:
        found = re.search(r"GLOBAL (\S+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (
            f"it holds a Python object{what} that no darkknowledge checkpoint contains, so it was not "
            "loaded and none of its code ran"
        )
    if isinstance(exc, EOFError) or "central directory" in text or "zip archive" in text:
        return "it is empty or truncated"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"it is not a torch checkpoint file ({first[:200]})"


def safe_load(path: str | Path, map_location: str | torch.device = "cpu", hint: str | None = None) -> dict[str, Any]:
    """Load a checkpoint (a dict, as every file darkknowledge writes) with ``weights_only=True``.

    Args:
        path: The file.
        map_location: Where tensors are loaded.
        hint: What the user can do about an unreadable file (default: :func:`restart_hint`).

    Raises:
        CheckpointError: The file is missing, cannot be read, or holds something other than a
            dict (e.g. a bare tensor): it names the file, why, and what to delete (never advice
            to load it with ``weights_only=False``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        reason = _unreadable_reason(exc)
    else:
        if isinstance(payload, dict):
            return payload
        reason = f"it holds a {type(payload).__name__}, not the dict of a darkknowledge checkpoint"
    raise CheckpointError(
        f"cannot read checkpoint {str(path)!r}: {reason}; it is damaged or not a darkknowledge "
        f"checkpoint. {hint or restart_hint(path)}"
    )


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
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the global MT19937 state (numpy's stubs type the default as a dict)
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


def read_export(path: str | Path, hint: str | None = None) -> dict[str, Any]:
    """The whole payload of a file written by :func:`export_model` (spec, state_dict, extras).

    Args:
        path: The exported model file.
        hint: What to do about a bad file (default: :func:`restart_hint`).

    Raises:
        CheckpointError: The file is unreadable, not an exported model, or malformed (no dict,
            a missing or ill-typed ``spec`` or ``state_dict``); the message names the file.
    """
    payload = safe_load(path, hint=hint)
    where = f"{str(path)!r}"
    if payload.get("kind") != "model":
        raise CheckpointError(
            f"{where} is not an exported model (kind={payload.get('kind')!r}); "
            "export one with darkknowledge.engine.checkpoint.export_model or `dk distill`"
        )
    problem = _export_problem(payload)
    if problem:
        raise CheckpointError(f"exported model {where} is malformed: {problem}. {hint or restart_hint(path)}")
    return payload


def _export_problem(payload: dict[str, Any]) -> str:
    """What is wrong with an exported model's ``spec`` and ``state_dict`` ('' when nothing)."""
    missing = [k for k in ("spec", "state_dict") if k not in payload]
    if missing:
        return f"it lacks {' and '.join(repr(k) for k in missing)}"
    spec, state = payload["spec"], payload["state_dict"]
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        return f"its spec must be a dict with a model 'name', got {spec!r:.120}"
    if not isinstance(spec.get("params", {}), dict):
        return f"its spec's params must be a dict, got {spec['params']!r:.120}"
    if not isinstance(state, dict) or not state:
        return f"its state_dict must be a non-empty dict of tensors, got {type(state).__name__}"
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        return f"its state_dict holds entries that are not named tensors: {bad[:3]}"
    return ""


def load_exported(path: str | Path, hint: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return ``(spec, state_dict)`` of a file written by :func:`export_model` (checked by :func:`read_export`)."""
    payload = read_export(path, hint=hint)
    return payload["spec"], payload["state_dict"]


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, where: str = "checkpoint") -> None:
    """``model.load_state_dict(state)``; weights that do not fit raise one ``CheckpointError``.

    Args:
        model: The model built from the file's spec.
        state: The file's weights.
        path: The file, for the message.
        where: What the file is (``teacher.checkpoint``, ``checkpoint``), for the message.
    """
    problem = weights_problem(model.state_dict(), state)
    if not problem:
        try:
            model.load_state_dict(state)
            return
        except RuntimeError as exc:
            problem = " ".join(str(exc).split())[:200]
    raise CheckpointError(
        f"{where} {str(path)!r}: its weights do not fit the {getattr(model, 'dk_name', 'model')} "
        f"model its spec builds ({problem}); the file is damaged or its spec was edited: "
        "export the model again"
    )


def check_export_fits(
    payload: dict[str, Any],
    path: str | Path,
    dataset: str,
    input_shape: Sequence[int],
    num_classes: int,
    where: str = "checkpoint",
) -> None:
    """Refuse an exported model trained on inputs of another shape or another number of classes.

    The export's spec records ``input_shape`` and ``num_classes`` (zoo models) and its
    ``data`` the dataset it was trained on.

    Args:
        payload: The export (see :func:`read_export`).
        path: The file, for the message.
        dataset: The dataset it is about to be used on.
        input_shape: That dataset's input shape.
        num_classes: That dataset's number of classes.
        where: What the file is (``teacher.checkpoint``, ``checkpoint``), for the message.

    Raises:
        CheckpointError: The shapes or class counts differ; the message names both sides.
    """
    params = payload["spec"].get("params", {})
    trained_on = (payload.get("data") or {}).get("name") if isinstance(payload.get("data"), dict) else None
    origin = f" (trained on {trained_on!r})" if trained_on else ""
    shape = params.get("input_shape")
    if shape is not None and list(shape) != list(input_shape):
        raise CheckpointError(
            f"{where} {str(path)!r} holds a model for inputs of shape {tuple(shape)}{origin}, but dataset "
            f"{dataset!r} has inputs of shape {tuple(input_shape)}; use a model trained on data of this shape"
        )
    classes = params.get("num_classes")
    if classes is not None and classes != num_classes:
        raise CheckpointError(
            f"{where} {str(path)!r} holds a model that predicts {classes} classes{origin}, but dataset "
            f"{dataset!r} has {num_classes}; use a model trained on data with these classes"
        )
