"""Small recipes and subprocess helpers shared by the end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

TINY = {
    "name": "tiny",
    "seeds": [0, 1],
    "data": {"name": "mnist1d", "params": {"num_samples": 1000, "transfer_samples": 0}, "batch_size": 50},
    "teacher": {"name": "cnn1d", "params": {"channels": 16}, "train": {"epochs": 3, "optimizer": {"lr": 0.01}}},
    "student": {"name": "mlp", "params": {"hidden": [32]}},
    "losses": {"kd": {"T": 4.0, "alpha": 0.9}},
    "train": {"epochs": 3, "optimizer": {"name": "adamw", "lr": 0.005}, "deterministic": True, "device": "cpu"},
}


def write_recipe(path: Path, **changes: Any) -> Path:
    """Write :data:`TINY` with top-level ``changes`` merged in, as YAML."""
    from darkknowledge.config import deep_merge

    path.write_text(yaml.safe_dump(deep_merge(TINY, changes)))
    return path


def dk(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m darkknowledge.cli ARGS`` and return the finished process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "darkknowledge.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def results(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``results.json`` entries by name."""
    data = json.loads((run_dir / "results.json").read_text())
    return {m["name"]: m for m in data["models"]}


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""For a 2-process DDP test and its 1-process reference alike: ``torchrun`` gives each rank one
thread when OMP_NUM_THREADS is unset (and keeps any inherited value), while a plain process uses
every core; other thread counts pick other kernels (the weights then differ at the 1e-8 level
for another reason than the gradient averaging under test) and 2 ranks x N threads
oversubscribe a 2-core machine."""


def torchrun(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m darkknowledge.cli ARGS`` with one thread per
    rank. ``--standalone`` binds its store to a port the OS picks (no port race between tests);
    ``--local-addr`` gives the ranks the loopback address instead of a name looked up in DNS."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD, **(env or {})}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--local-addr=127.0.0.1",
            "-m",
            "darkknowledge.cli",
            *args,
        ],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def result_entry(name: str, role: str, acc: float, seed: int | None = 0, **more: Any) -> dict[str, Any]:
    """A results entry as a run records it (a teacher is a ``cnn``, the others ``mlp``s; the
    baseline's method ``ce``, a student's ``kd``), with ``more`` fields."""
    return {
        "name": name,
        "role": role,
        "model": "cnn" if role == "teacher" else "mlp",
        "method": None if role == "teacher" else ("ce" if role == "baseline" else "kd"),
        "seed": seed,
        "params": 1000,
        "last_acc": acc,
        "best_acc": acc,
        "train_seconds": 1.0,
        **more,
    }
