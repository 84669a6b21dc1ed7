"""An MLflow run of a dk run's metrics (``log.mlflow``; the ``mlflow`` extra).

One MLflow run per dk run, in the experiment named by ``log.experiment`` (default: the recipe
name), named after the run folder; its params are the resolved config (dotted keys), its
metrics the records of ``metrics.jsonl`` (``<stage>/train/<term>`` ... at step = the epoch;
characters MLflow does not allow in a key, like ``+`` and ``@``, become ``_``). A resumed run
continues the same MLflow run (its id is kept in the run folder's ``loggers.json``).

The default store is a sqlite file in the run folder: MLflow 3's file store (``./mlruns``) is
in maintenance mode and refuses to open unless ``MLFLOW_ALLOW_FILE_STORE=true``. View it with
``mlflow ui --backend-store-uri sqlite:///runs/NAME/mlflow/mlflow.db`` (the full ``mlflow``
package).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from darkknowledge.errors import ConfigError

log = logging.getLogger(__name__)

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_BATCH = 100  # params and tags per log_batch call (MLflow's limit)


def metric_key(tag: str) -> str:
    """``ce+kd-s0/train/kd`` -> ``ce_kd-s0/train/kd``: a key MLflow accepts on every platform."""
    return _BAD_KEY_CHARS.sub("_", tag)[:_MAX_KEY]


def config_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The config's leaves as ``{"train.optimizer.lr": "0.005"}`` (lists and empty mappings as JSON)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(config_params(value, path + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            out[metric_key(path)] = text[:_MAX_PARAM_VALUE]
    return out


@contextmanager
def _quiet_store() -> Iterator[None]:
    """MLflow logs at INFO while it creates a sqlite store's tables; keep that out of a run's log."""
    names = ("mlflow.store.db.utils", "alembic.runtime.migration")
    before = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for n, level in zip(names, before):
            logging.getLogger(n).setLevel(level)


class MLflowSink:
    """One MLflow run (see the module docstring).

    Args:
        uri: Tracking URI (``sqlite:///...``, ``http://...``, ``databricks``...).
        experiment: Experiment name (created when missing).
        run_name: The MLflow run's name.
        config: The resolved config, logged as params of a new run.
        run_id: The run to continue (a resumed dk run); a new one when None or gone.
        artifacts: Artifact folder of a new experiment in a local store (None: the store's default).
        tags: Tags of a new run.

    Raises:
        ConfigError: MLflow cannot open the store or create the run.
    """

    name = "mlflow"

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        config: Mapping[str, Any],
        run_id: str | None = None,
        artifacts: Path | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        self.uri = uri
        try:
            with _quiet_store():
                self.client = MlflowClient(tracking_uri=uri)
                self.run_id, self.resumed = self._continue(run_id, MlflowException), False
                if self.run_id is not None:
                    self.resumed = True
                    self.client.update_run(self.run_id, status="RUNNING")
                else:
                    found = self.client.get_experiment_by_name(experiment)
                    if artifacts is not None and found is None:
                        artifacts.mkdir(parents=True, exist_ok=True)
                    exp_id = (
                        found.experiment_id
                        if found is not None
                        else self.client.create_experiment(
                            experiment,
                            artifact_location=artifacts.resolve().as_uri() if artifacts is not None else None,
                        )
                    )
                    run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
                    self.run_id = run.info.run_id
                    params = [Param(k, v) for k, v in config_params(config).items()]
                    for i in range(0, len(params), _BATCH):
                        self.client.log_batch(self.run_id, params=params[i : i + _BATCH])
        except MlflowException as exc:
            raise ConfigError(f"log.mlflow: MLflow cannot use the tracking store {uri!r}: {exc.message}") from None

    def _continue(self, run_id: str | None, error: type[Exception]) -> str | None:
        """``run_id`` when the store still holds that run (not deleted), else None."""
        if not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except error:
            log.warning(
                "log.mlflow: the run %s of this folder is not in %s; starting a new MLflow run", run_id, self.uri
            )
            return None
        return run_id if run.info.lifecycle_stage == "active" else None

    def write(self, step: int, values: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(metric_key(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
