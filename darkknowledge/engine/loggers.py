"""Metrics to TensorBoard and MLflow besides ``metrics.jsonl``: the ``log`` section of a recipe.

``metrics.jsonl`` stays the run's record; the loggers get a copy of each record it gets (rank 0
only), as scalars keyed ``<stage>/train/<term>``, ``<stage>/lr``, ``<stage>/test/<model>/top1``
(``/loss``, ``/top5``; ``val/`` beside ``test/`` when there is a validation split), at step =
the epoch. Each logger is an optional extra, imported only when asked
(:mod:`~darkknowledge.engine.tensorboard_sink`, :mod:`~darkknowledge.engine.mlflow_sink`).

``loggers.json`` in the run folder says how many records each logger has been sent (and the
MLflow run id). A resumed run appends to the same event folder and the same MLflow run, first
sending what ``metrics.jsonl`` got while the logger was not there: a logger switched on at
``--resume`` receives the whole run, and one that failed mid-run (a server gone away: a
warning, and training goes on) catches up at the next resume.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from darkknowledge.config import LOGGERS, LogConfig
from darkknowledge.engine.checkpoint import atomic_write_text
from darkknowledge.errors import ConfigError

log = logging.getLogger(__name__)

STATE_FILE = "loggers.json"
_PACKAGES = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow",)}
_SQL_PACKAGES = ("sqlalchemy", "alembic")  # MLflow's sqlite store (mlflow-skinny does not bring them)
_NOT_SCALARS = {"kind", "stage", "epoch", "step", "n"}


class Sink(Protocol):
    """Where one logger's scalars go."""

    name: str

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Log ``values`` (tag -> number) at ``step``."""

    def close(self, status: str) -> None:
        """Flush and close; ``status`` is ``FINISHED``, ``FAILED`` or ``KILLED``."""


def scalars(record: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """A ``metrics.jsonl`` record as ``(step, {tag: value})``: nested keys joined by ``/`` under
    the record's stage; step = the epoch. Counts (``n``) and non-numbers are left out."""
    stage = str(record.get("stage", "run"))
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                if str(k) not in _NOT_SCALARS:
                    walk(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    for key, value in record.items():
        if key not in _NOT_SCALARS:
            walk(f"{stage}/{key}", value)
    return int(record.get("epoch", 0)), out


def _import(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def tensorboard_dir(cfg: LogConfig, run_dir: Path | None) -> Path:
    """Where the event files go: ``<run>/tensorboard``, or the folder ``log.tensorboard`` names."""
    if isinstance(cfg.tensorboard, str):
        return Path(cfg.tensorboard)
    if run_dir is None:
        raise ConfigError(
            "log.tensorboard=true writes event files into the run folder, and this run has none; "
            "give one (--out DIR, out= in the Python API) or a folder: log.tensorboard=PATH"
        )
    return Path(run_dir) / "tensorboard"


def mlflow_uri(cfg: LogConfig, run_dir: Path | None) -> str:
    """The tracking URI: ``log.mlflow`` when it is one; else ``$MLFLOW_TRACKING_URI``; else a local
    sqlite store in ``<run>/mlflow`` (MLflow 3's file store is in maintenance mode and refuses to open)."""
    if isinstance(cfg.mlflow, str):
        return cfg.mlflow
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if run_dir is None:
        raise ConfigError(
            "log.mlflow=true keeps its store in the run folder, and this run has none; give one "
            "(--out DIR, out= in the Python API) or a tracking URI: log.mlflow=sqlite:///PATH/mlflow.db "
            "(or set MLFLOW_TRACKING_URI)"
        )
    return "sqlite:///" + str((Path(run_dir) / "mlflow" / "mlflow.db").resolve())


def check_loggers(cfg: LogConfig, run_dir: Path | None) -> None:
    """Before anything runs: each asked logger's package is installed and it has a place to write.

    Raises:
        ConfigError: A missing package (naming the extra to install), or no place to write.
    """
    for name in cfg.asked():
        missing = [p for p in _PACKAGES[name] if not _import(p)]
        if name == "mlflow" and not missing and mlflow_uri(cfg, run_dir).startswith("sqlite:"):
            missing = [p for p in _SQL_PACKAGES if not _import(p)]
        if missing:
            raise ConfigError(
                f"log.{name}: the package {missing[0]!r} is not installed; install the extra: "
                f'pip install "darkknowledge[{name}]" (or set log.{name}=false)'
            )
        if name == "tensorboard":
            tensorboard_dir(cfg, run_dir)
        else:
            mlflow_uri(cfg, run_dir)


class Loggers:
    """The asked loggers of one run: each record of ``metrics.jsonl`` goes to each of them.

    Args:
        sinks: Opened sinks, with the number of records each was already sent.
        state: ``loggers.json`` (None: a run without a folder keeps no state).
        facts: What ``loggers.json`` records per logger besides the count (e.g. the MLflow run id).
    """

    def __init__(
        self, sinks: list[tuple[Sink, int]], state: Path | None, facts: dict[str, dict[str, Any]] | None = None
    ) -> None:
        self._sinks = [s for s, _ in sinks]  # those still sent records (one that failed is dropped)
        self._sent = {s.name: n for s, n in sinks}
        self._facts = facts or {}
        self._state = state
        self._outcome = {"failed": False}
        self._finalizer = weakref.finalize(self, _close_all, list(self._sinks), self._outcome)

    def catch_up(self, records: list[dict[str, Any]]) -> None:
        """Send each logger the records of ``metrics.jsonl`` it has not had (a resumed run)."""
        for sink in list(self._sinks):
            for record in records[self._sent[sink.name] :]:
                self._send(sink, record)
        self._save()

    def write(self, record: dict[str, Any]) -> None:
        """Send one new record of ``metrics.jsonl`` to every logger."""
        for sink in list(self._sinks):
            self._send(sink, record)
        self._save()

    def _send(self, sink: Sink, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        values = {k: v for k, v in values.items() if math.isfinite(v)}
        try:
            sink.write(step, values)
        except Exception as exc:  # noqa: BLE001 - a logger's failure must not end the training
            log.warning(
                "log.%s: stopped sending metrics (%s: %s); metrics.jsonl keeps every record, and --resume "
                "sends the rest",
                sink.name,
                type(exc).__name__,
                exc,
            )
            self._sinks.remove(sink)
            return
        self._sent[sink.name] += 1

    def _save(self) -> None:
        if self._state is None:
            return
        state = {name: {**self._facts.get(name, {}), "sent": n} for name, n in self._sent.items()}
        atomic_write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", self._state)

    def failed(self) -> None:
        """A stage failed: the run closes as ``FAILED``."""
        self._outcome["failed"] = True

    def close(self, failed: bool | None = None, interrupted: bool = False) -> None:
        """Flush and close every logger (also done when the session is collected or the process ends)."""
        if failed:
            self._outcome["failed"] = True
        if interrupted:
            self._outcome["interrupted"] = True
        self._finalizer()


@contextmanager
def marks_failure(loggers: Loggers | None) -> Iterator[None]:
    """A stage's training: an error (or interrupt) escaping it marks the loggers' run as failed, then propagates."""
    try:
        yield
    except BaseException:
        if loggers is not None:
            loggers.failed()
        raise


def _close_all(sinks: list[Sink], outcome: dict[str, bool]) -> None:
    status = "KILLED" if outcome.get("interrupted") else "FAILED" if outcome["failed"] else "FINISHED"
    for sink in sinks:
        try:
            sink.close(status)
        except Exception as exc:  # noqa: BLE001 - closing the others matters more
            log.warning("log.%s: could not close (%s: %s)", sink.name, type(exc).__name__, exc)


def read_state(run_dir: Path | None) -> dict[str, Any]:
    """``loggers.json`` of a run folder ({} when there is none or it is unreadable)."""
    if run_dir is None:
        return {}
    try:
        data = json.loads((Path(run_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def open_loggers(
    cfg: LogConfig,
    run_dir: Path | None,
    *,
    name: str,
    config: Mapping[str, Any],
    resume: bool,
    records: list[dict[str, Any]],
) -> Loggers | None:
    """Open the loggers ``cfg`` asks for (None when it asks for none): a fresh run starts new ones;
    a resumed run continues those ``loggers.json`` names and sends them what they missed.

    Args:
        cfg: The ``log`` section.
        run_dir: The run folder (None: a run that writes no folder).
        name: The recipe's name (the default MLflow experiment).
        config: The resolved config (MLflow params).
        resume: Continue the loggers of the run in ``run_dir``.
        records: The records already in ``metrics.jsonl``.

    Raises:
        ConfigError: A logger that cannot be opened (see :func:`check_loggers`; a tracking store
            MLflow refuses).
    """
    if not cfg.asked():
        return None
    check_loggers(cfg, run_dir)
    state = read_state(run_dir) if resume else {}
    sinks: list[tuple[Sink, int]] = []
    facts: dict[str, dict[str, Any]] = {}
    if cfg.tensorboard is not False:
        from darkknowledge.engine.tensorboard_sink import TensorBoardSink

        folder = tensorboard_dir(cfg, run_dir).resolve()
        before = state.get("tensorboard", {})
        sent = int(before.get("sent", 0)) if before.get("dir") == str(folder) else 0
        sinks.append((TensorBoardSink(folder), sent))
        facts["tensorboard"] = {"dir": str(folder)}
    if cfg.mlflow is not False:
        from darkknowledge.engine.mlflow_sink import MLflowSink

        uri = mlflow_uri(cfg, run_dir)
        before = state.get("mlflow", {})
        same = before.get("uri") == uri
        artifacts = (
            Path(run_dir) / "mlflow" / "artifacts" if run_dir is not None and uri.startswith("sqlite:") else None
        )
        sink = MLflowSink(
            uri,
            cfg.experiment or name,
            run_name=Path(run_dir).name if run_dir is not None else name,
            config=config,
            run_id=before.get("run_id") if same else None,
            artifacts=artifacts,
            tags={"darkknowledge.run_dir": str(Path(run_dir).resolve()) if run_dir is not None else ""},
        )
        sinks.append((sink, int(before.get("sent", 0)) if same and sink.resumed else 0))
        facts["mlflow"] = {"uri": uri, "run_id": sink.run_id, "experiment": cfg.experiment or name}
    opened = Loggers(sinks, Path(run_dir) / STATE_FILE if run_dir is not None else None, facts)
    opened.catch_up(records)
    log.info("metrics also go to %s", ", ".join(_where(n, f) for n, f in facts.items()))
    return opened


def _where(name: str, facts: Mapping[str, Any]) -> str:
    return (
        f"TensorBoard ({facts['dir']})" if name == "tensorboard" else f"MLflow ({facts['uri']}, run {facts['run_id']})"
    )


__all__ = ["LOGGERS", "Loggers", "Sink", "check_loggers", "open_loggers", "scalars"]
