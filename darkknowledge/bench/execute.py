"""Run one cell: the worker side of ``dk bench`` (any executor calls :func:`run_cell`).

A cell trains in its own run folder with the same commands as ``dk train`` and ``dk distill``
(so an interrupted cell continues from its last epoch) and writes one small result JSON,
atomically, last: a cell is finished exactly when its result file exists. It writes nothing
else outside its own folder.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from darkknowledge.atomic import atomic_write
from darkknowledge.bench.cells import CellTask, check_cell_config
from darkknowledge.engine.checkpoint import read_export, state_hash
from darkknowledge.errors import (
    CheckpointError,
    ConfigError,
    DivergenceError,
    ShapeError,
    TapError,
)

log = logging.getLogger(__name__)

NOT_APPLICABLE = (ConfigError, ShapeError, TapError)
"""Errors that make a (pair, method) combination inapplicable (e.g. a loss that needs feature
maps on a student without them): the preflight raises them before anything trains."""

CELL_FILE = "cell.json"
"""The key of the config a cell's run folder was started with (a stale folder is discarded)."""
RUN_DIR = "run"
"""The run folder inside a cell's work folder (``dk train``/``dk distill``'s ``--out``)."""


def prepare_work_dir(task: CellTask) -> bool:
    """Make ``task.work_dir`` ready; True when it holds a started run of the same key (resume it).

    A folder started for another key (the cell went stale) is removed: its checkpoints belong
    to a config that no longer exists.
    """
    work = Path(task.work_dir)
    marker = work / CELL_FILE
    if marker.is_file():
        try:
            same = json.loads(marker.read_text()).get("key") == task.key
        except (OSError, ValueError):
            same = False
        if same:
            return (work / RUN_DIR / "run.json").is_file()
    if work.exists():
        log.info("%s: discarding the run folder of an earlier config", task.cell.id)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write(marker, lambda f: f.write(json.dumps({"key": task.key, "cell": task.cell.id})), binary=False)
    return False


def run_cell(task: CellTask, threads: int | None = None) -> dict[str, Any]:
    """Train the cell and write its result file; returns the result.

    Args:
        task: The cell and its config.
        threads: torch's intra-op threads for this cell (None: leave as is).

    Returns:
        The result dict (see :func:`_result`); ``status`` is ``done`` or ``n/a`` (the combination
        cannot run, or it diverged: the reason says which).
    """
    from darkknowledge.commands import distill, train

    if threads:
        torch.set_num_threads(threads)
    cell = task.cell
    resume = prepare_work_dir(task)
    start = time.perf_counter()
    cfg = check_cell_config(task.config, cell.id)
    # tables read accuracy and training cost; a model's size/latency profile is dk run's and dk export's
    cfg = cfg.model_copy(update={"profile": cfg.profile.model_copy(update={"enabled": False})})
    out = Path(task.work_dir) / RUN_DIR
    try:
        if cell.kind == "teacher":
            res = train(cfg, out, resume, False, which="teacher")
            entries, exported = [res["student"]], res["exported"]
        elif cell.kind == "baseline":
            res = train(cfg, out, resume, False, which="student")
            entries, exported = [res["student"]], res["exported"]
        else:
            res = distill(cfg, out, resume, False)
            entries, exported = list(res["entries"]), res["exported"]
            entries += [e for e in _run_results(out) if e.get("role") == "teacher" and e.get("train_seconds")]
    except DivergenceError as exc:
        result = _base(task) | {"status": "n/a", "reason": f"diverged: {exc}"}
    except CheckpointError:
        raise  # a damaged teacher file is the suite's problem, not the method's
    except NOT_APPLICABLE as exc:
        if (out / "results.json").is_file():  # it trained: not an inapplicable combination but a failure
            raise
        result = _base(task) | {"status": "n/a", "reason": str(exc)}
    else:
        result = _result(task, entries, exported)
    result["wall_seconds"] = round(time.perf_counter() - start, 3)
    atomic_write(Path(task.result_path), lambda f: f.write(json.dumps(result, indent=1, sort_keys=True)), binary=False)
    return result


def _run_results(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "results.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return data.get("models", []) if isinstance(data, dict) else data


def _base(task: CellTask) -> dict[str, Any]:
    cell = task.cell
    return {
        "suite": task.suite,
        "pair": cell.pair,
        "method": cell.method,
        "kind": cell.kind,
        "seed": cell.seed,
        "key": task.key,
        "hp": task.hp,
        "tuned": task.tuned,
        "teacher": task.teacher,
        "config": task.config,
        "host": platform.node(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _result(task: CellTask, entries: list[dict[str, Any]], exported: Any) -> dict[str, Any]:
    """The result of a finished cell, from the run's results entries."""
    main = entries[0]
    own_teachers = [e for e in entries[1:] if e.get("role") == "teacher"]
    members = [e for e in entries[1:] if e.get("role") != "teacher"]
    caches = main.get("teacher_cache") or []
    caches = caches if isinstance(caches, list) else [caches]
    teacher_seconds = sum(float(c.get("build_seconds", 0.0)) for c in caches if not c.get("reused"))
    teacher_seconds += sum(float(e.get("train_seconds", 0.0)) for e in own_teachers)
    extra: dict[str, Any] = {}
    if task.cell.kind == "teacher":
        teacher_seconds = float(main.get("train_seconds", 0.0))
        extra["hash"] = state_hash(read_export(exported)["state_dict"])  # the identity its students record
        # the teacher travels with the results, so a suite can be finished on another machine
        data = Path(exported).read_bytes()
        atomic_write(Path(task.result_path).with_suffix(".pt"), lambda f: f.write(data))
    return (
        _base(task)
        | extra
        | {
            "status": "done",
            "student": main.get("model"),
            "last_acc": main.get("last_acc"),
            "best_acc": main.get("best_acc"),
            "best_epoch": main.get("best_epoch"),
            "best_selected_on": main.get("best_selected_on"),
            # keep_better trained the student alone too: the delivered student cost both
            "train_seconds": float((main.get("selection") or main).get("train_seconds", 0.0)),
            "kept": (main.get("selection") or {}).get("kept"),
            "teacher_seconds": round(teacher_seconds, 3),
            "params": main.get("params"),
            "extra_params": main.get("extra_params", 0),
            "steps": main.get("steps"),
            "epochs": main.get("epochs"),
            "losses": main.get("losses"),
            "members": [
                {
                    "role": e.get("role"),
                    "model": e.get("model"),
                    "last_acc": e.get("last_acc"),
                    "params": e.get("params"),
                }
                for e in members
            ],
            "exported": str(exported) if exported else None,
        }
    )
