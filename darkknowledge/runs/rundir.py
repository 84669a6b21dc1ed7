"""Run folders: where a run writes its config, metrics, checkpoints and results.

Layout::

    runs/<name>/
      run.json           what wrote the folder: the command (run, distill, train --model M) and recipe name
      config.yaml        the resolved config
      metrics.jsonl      one line per epoch and evaluation, every stage
      results.json       one entry per trained model (name, role, seed, params, accuracies, time)
      report.md          (dk run) the comparison table and verdict
      .lock              held by the one process writing the folder (see runs/lock.py)
      <stage>/last.pt    full training state, for --resume
      <stage>/best.pt    weights at the best evaluation
      <stage>/model.pt   the trained model alone (weights + the spec that rebuilds it)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from darkknowledge.engine.checkpoint import atomic_write_text
from darkknowledge.errors import CheckpointError, ConfigError

IDENTITY_FILE = "run.json"
IDENTITY_KEYS = ("command", "model", "name")  # what must match for a folder to be resumed


def describe_identity(identity: Mapping[str, Any]) -> str:
    """``dk train --model teacher (recipe 'tiny')`` for an identity of :func:`RunDir.write_identity`."""
    command = identity.get("command") or "?"
    text = f"dk {command}" + (f" --model {identity['model']}" if identity.get("model") else "")
    return text + (f" (recipe {identity['name']!r})" if identity.get("name") else "")


def read_identity(folder: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` of a run folder, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((Path(folder) / IDENTITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def same_identity(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two identities name the same command, model and recipe."""
    return all(a.get(k) == b.get(k) for k in IDENTITY_KEYS)


def choose_run_dir(
    name: str,
    out: str | Path | None,
    resume: bool,
    base: str | Path = "runs",
    identity: Mapping[str, Any] | None = None,
) -> Path:
    """The run folder: ``out`` if given; else ``runs/<name>`` or, when that holds an earlier
    run and we are not resuming, the next free ``runs/<name>-N`` (nothing is overwritten).

    With ``resume`` and no ``out``: the most recent ``runs/<name>[-N]`` whose ``run.json`` was
    written by the same command (``identity``: command, ``--model``, recipe name), never another
    command's folder; a folder without ``run.json`` (an older darkknowledge's) is resumed only
    when named with ``--out``.

    Raises:
        ConfigError: ``out`` is empty, or ``resume`` without ``out`` finds no matching folder.
    """
    if out is not None:
        if not str(out).strip():
            raise ConfigError("--out: empty path; give the run folder, e.g. --out runs/my-run")
        return Path(out)
    base = Path(base)
    candidates = [base / name] + sorted(base.glob(f"{name}-*"), key=lambda p: _suffix(p, name))
    existing = [p for p in candidates if p.exists() and _suffix(p, name) > 0]
    if resume:
        ours = [
            p
            for p in existing
            if (found := read_identity(p)) is not None and (identity is None or same_identity(found, identity))
        ]
        if ours:
            return ours[-1]
        what = describe_identity(identity) if identity is not None else f"recipe {name!r}"
        others = [f"{p} ({describe_identity(i) if (i := read_identity(p)) else 'no run.json'})" for p in existing]
        raise ConfigError(
            f"--resume: no run folder of {what} under {str(base)!r} to continue"
            + (f" (found only {', '.join(others)})" if others else "")
            + "; name the folder with --out DIR, or drop --resume to start a new run"
        )
    if not (base / name).exists():
        return base / name
    n = max((_suffix(p, name) for p in existing), default=1) + 1
    return base / f"{name}-{n}"


def _suffix(path: Path, name: str) -> int:
    """1 for ``runs/<name>``, N for ``runs/<name>-N``, 0 for anything else (``<name>-best``)."""
    if path.name == name:
        return 1
    tail = path.name[len(name) + 1 :]
    return int(tail) if tail.isdigit() else 0


def trained_stages(folder: str | Path) -> list[str]:
    """Names of the stage folders (and exported models) in ``folder`` that hold trained weights."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        p.name
        for p in sorted(folder.iterdir())
        if p.is_dir() and any((p / f).is_file() for f in ("last.pt", "best.pt", "model.pt"))
    ]
    return found + [p.name for p in sorted(folder.glob("*.pt")) if p.is_file()]


class RunDir:
    """A run folder (``path=None``: an in-memory run that writes nothing).

    Args:
        path: The folder.
        writer: Whether this process writes (rank 0).
        fresh: A new run: what an earlier run left in ``results.json`` is not read (a resumed
            run reads it to skip its finished stages).

    Raises:
        CheckpointError: ``results.json`` is unreadable (a resumed run needs it).
    """

    def __init__(self, path: Path | None, writer: bool = True, fresh: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.writer = writer and path is not None
        self._results: list[dict[str, Any]] = []
        if self.path is not None and not fresh and (self.path / "results.json").is_file():
            self._results = _read_results(self.path / "results.json")

    def stage_dir(self, stage: str) -> Path | None:
        return self.path / stage if self.path is not None else None

    def _written(self) -> Path | None:
        """The folder, when this process writes into it (None: it writes nothing)."""
        return self.path if self.writer else None

    @property
    def metrics_path(self) -> Path | None:
        out = self._written()
        return out / "metrics.jsonl" if out is not None else None

    def write_config(self, config: dict[str, Any]) -> None:
        if (out := self._written()) is not None:
            atomic_write_text(yaml.safe_dump(config, sort_keys=False), out / "config.yaml")

    def write_identity(self, identity: Mapping[str, Any]) -> None:
        """Record what writes this folder (``run.json``), so --resume finds and checks it."""
        if (out := self._written()) is not None:
            atomic_write_text(json.dumps(dict(identity), indent=2) + "\n", out / IDENTITY_FILE)

    def result(self, stage: str) -> dict[str, Any] | None:
        """The recorded entry of a finished stage (used to skip it on --resume)."""
        return next((r for r in self._results if r["name"] == stage), None)

    @property
    def results(self) -> list[dict[str, Any]]:
        return list(self._results)

    def add_result(self, entry: dict[str, Any], run_name: str) -> None:
        """Record a finished model and rewrite ``results.json`` atomically."""
        self._results = [r for r in self._results if r["name"] != entry["name"]] + [entry]
        if (out := self._written()) is not None:
            text = json.dumps({"run": run_name, "models": self._results}, indent=2)
            atomic_write_text(text + "\n", out / "results.json")

    def write_text(self, name: str, text: str) -> Path | None:
        out = self._written()
        return atomic_write_text(text, out / name) if out is not None else None


def _read_results(path: Path) -> list[dict[str, Any]]:
    """The ``models`` of a ``results.json``; a truncated or foreign file is one clear error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        models = data["models"]
        if not isinstance(models, list) or not all(
            isinstance(m, dict) and isinstance(m.get("name"), str) for m in models
        ):
            raise ValueError("'models' is not a list of entries with a name")
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        reason = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise CheckpointError(
            f"cannot read {str(path)!r} ({reason}); it lists this run's finished stages. Delete it and run "
            "again with --resume (finished stages are rebuilt from their last.pt), or start a new run folder "
            "with --out."
        ) from None
    return models
