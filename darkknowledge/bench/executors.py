"""Where cells run: this process, a pool of local processes, or an existing cluster engine.

Cells are independent and write only their own folder and result file, so an executor only
has to call :func:`darkknowledge.bench.execute.run_cell` on each task somewhere and say when it
ended. ``serial`` runs them here one by one; ``local`` (``--jobs N``) in N spawned processes on
this machine, the cores shared between them; ``submitit`` submits each cell as a job through
`submitit <https://github.com/facebookincubator/submitit>`_ (SLURM on a cluster, local
processes elsewhere; ``pip install "darkknowledge[cluster]"``).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from darkknowledge.bench.cells import CellTask
from darkknowledge.bench.execute import run_cell
from darkknowledge.errors import ConfigError

EXECUTORS = ("serial", "local", "submitit")

Outcome = tuple[CellTask, dict[str, Any] | None, BaseException | None]
"""A finished task: its result, or the exception it raised."""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_tasks(
    tasks: Sequence[CellTask],
    executor: str = "serial",
    jobs: int = 1,
    folder: Path | None = None,
    cluster: str | None = None,
    slurm: dict[str, Any] | None = None,
) -> Iterator[Outcome]:
    """Run ``tasks`` and yield each one as it ends (in completion order).

    Args:
        tasks: The cells to run.
        executor: ``serial``, ``local`` or ``submitit``.
        jobs: Parallel cells (``local``: processes; ``submitit``: at most this many jobs at once).
        folder: Where submitit keeps its job files.
        cluster: submitit's cluster (``slurm``, ``local``, ``debug``; None: SLURM when found, else local).
        slurm: submitit parameters (``timeout_min``, ``slurm_partition``, ``gpus_per_node``, ...).

    Raises:
        ConfigError: Unknown executor, ``jobs`` < 1, or submitit not installed.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: expected 1 or more")
    if not tasks:
        return
    if executor == "serial" or (executor == "local" and jobs == 1):
        for task in tasks:
            yield _call(run_cell, task)
    elif executor == "local":
        yield from _local(tasks, jobs)
    else:
        yield from _submitit(tasks, jobs, folder, cluster, slurm or {})


def _call(fn: Callable[..., dict[str, Any]], task: CellTask, *args: Any) -> Outcome:
    try:
        return task, fn(task, *args), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - reported per cell; the runner decides
        return task, None, exc


def _local(tasks: Sequence[CellTask], jobs: int) -> Iterator[Outcome]:
    threads = max(1, _cores() // jobs)
    ctx = multiprocessing.get_context("spawn")  # no forked torch state (threads, CUDA) in the workers
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(run_cell, task, threads): task for task in tasks}
        try:
            for fut in cf.as_completed(futures):
                exc = fut.exception()
                yield futures[fut], (None if exc else fut.result()), exc
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _submitit(
    tasks: Sequence[CellTask], jobs: int, folder: Path | None, cluster: str | None, params: dict[str, Any]
) -> Iterator[Outcome]:
    try:
        import submitit
    except ImportError:
        raise ConfigError('--executor submitit needs submitit: pip install "darkknowledge[cluster]"') from None
    if folder is None:
        raise ConfigError("--executor submitit needs a folder for its job files")
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    try:
        ex.update_parameters(**{"timeout_min": 24 * 60, **params})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--slurm: {exc}") from None
    pending = list(tasks)
    running: list[tuple[Any, CellTask]] = []
    while pending or running:
        while pending and len(running) < jobs:
            task = pending.pop(0)
            running.append((ex.submit(run_cell, task), task))
        job, task = running.pop(0)
        try:
            yield task, job.result(), None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - submitit wraps the cell's exception
            yield task, None, exc
