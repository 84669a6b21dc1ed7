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
        [sys.executable, "-m", "darkknowledge.cli", *args], cwd=cwd, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )


def results(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``results.json`` entries by name."""
    data = json.loads((run_dir / "results.json").read_text())
    return {m["name"]: m for m in data["models"]}
