"""Run folders: where a run writes its config, metrics, checkpoints and results.

Layout::

    runs/<name>/
      config.yaml        the resolved config
      metrics.jsonl      one line per epoch and evaluation, every stage
      results.json       one entry per trained model (name, role, seed, params, accuracies, time)
      report.md          (dk run) the comparison table and verdict
      <stage>/last.pt    full training state, for --resume
      <stage>/best.pt    weights at the best evaluation
      <stage>/model.pt   the trained model alone (weights + the spec that rebuilds it)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from darkknowledge.engine.checkpoint import atomic_write_text


def choose_run_dir(name: str, out: str | Path | None, resume: bool, base: str | Path = "runs") -> Path:
    """The run folder: ``out`` if given; else ``runs/<name>`` or, when that holds an earlier
    run and we are not resuming, the next free ``runs/<name>-N`` (nothing is overwritten).
    With ``resume`` and no ``out``, the most recent ``runs/<name>[-N]``."""
    if out is not None:
        return Path(out)
    base = Path(base)
    candidates = [base / name] + sorted(base.glob(f"{name}-*"), key=lambda p: _suffix(p, name))
    existing = [p for p in candidates if p.exists()]
    if resume:
        return existing[-1] if existing else base / name
    if not (base / name).exists():
        return base / name
    n = max((_suffix(p, name) for p in existing), default=1) + 1
    return base / f"{name}-{n}"


def _suffix(path: Path, name: str) -> int:
    tail = path.name[len(name) + 1 :]
    return int(tail) if tail.isdigit() else 1


class RunDir:
    """A run folder (``path=None``: an in-memory run that writes nothing).

    Args:
        path: The folder.
        writer: Whether this process writes (rank 0).
    """

    def __init__(self, path: Path | None, writer: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.writer = writer and path is not None
        self._results: list[dict[str, Any]] = []
        if self.path is not None and (self.path / "results.json").is_file():
            self._results = json.loads((self.path / "results.json").read_text()).get("models", [])

    def stage_dir(self, stage: str) -> Path | None:
        return self.path / stage if self.path is not None else None

    @property
    def metrics_path(self) -> Path | None:
        return self.path / "metrics.jsonl" if self.writer else None

    def write_config(self, config: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_text(yaml.safe_dump(config, sort_keys=False), self.path / "config.yaml")

    def result(self, stage: str) -> dict[str, Any] | None:
        """The recorded entry of a finished stage (used to skip it on --resume)."""
        return next((r for r in self._results if r["name"] == stage), None)

    @property
    def results(self) -> list[dict[str, Any]]:
        return list(self._results)

    def add_result(self, entry: dict[str, Any], run_name: str) -> None:
        """Record a finished model and rewrite ``results.json`` atomically."""
        self._results = [r for r in self._results if r["name"] != entry["name"]] + [entry]
        if self.writer:
            text = json.dumps({"run": run_name, "models": self._results}, indent=2)
            atomic_write_text(text + "\n", self.path / "results.json")

    def write_text(self, name: str, text: str) -> Path | None:
        if not self.writer:
            return None
        return atomic_write_text(text, self.path / name)
