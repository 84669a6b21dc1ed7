"""``dk bench``: run every cell of a suite that is not finished, then write its tables.

The runner checks the whole suite first (every cell's config is built and validated before any
cell trains), trains the pairs' teachers, then the students' cells, skipping every cell whose
result file exists with the current key. A finished cell whose key changed (its recipe, the
budget or the teacher changed) is *stale*: it is listed, excluded from the tables, and trained
again. Events go to ``<out>/bench.jsonl`` (a line when a cell is queued and when it ends), so a log
shows that no cell was run twice.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darkknowledge.bench.cells import (
    Cell,
    CellTask,
    cell_key,
    check_cell_config,
    plan_cells,
    student_config,
    teacher_config,
)
from darkknowledge.bench.executors import run_tasks
from darkknowledge.bench.suite import Suite
from darkknowledge.bench.tuned import tuned_values
from darkknowledge.config import read_recipe
from darkknowledge.engine.checkpoint import read_export, state_hash
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.runs.build import check_config

log = logging.getLogger(__name__)


@dataclass
class Status:
    """Where each cell of a suite stands."""

    done: list[Cell] = field(default_factory=list)
    stale: list[Cell] = field(default_factory=list)
    todo: list[Cell] = field(default_factory=list)
    waiting: list[Cell] = field(default_factory=list)  # their teacher is not trained yet
    failed: list[tuple[Cell, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        """A short human-readable summary."""
        out = [
            f"done {len(self.done)}, stale {len(self.stale)}, to run {len(self.todo)}"
            + (f", waiting for their teacher {len(self.waiting)}" if self.waiting else "")
            + (f", failed {len(self.failed)}" if self.failed else "")
        ]
        out += [f"  stale (config changed since it ran): {c.id}" for c in self.stale]
        out += [f"  failed: {c.id}: {why}" for c, why in self.failed]
        return out


def read_result(path: Path) -> dict[str, Any] | None:
    """A cell's result file, or None when absent or unreadable (then it runs again)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("%s is unreadable; its cell runs again", path)
        return None
    return data if isinstance(data, dict) else None


class Bench:
    """One suite's cells, configs, keys and results.

    Args:
        suite: The suite.
        out: The bench folder (cells' run folders, the event log, submitit's files).
        results: The results folder (one small JSON per cell, the tables); default ``out/results``.
        only: Cell id prefixes to keep (``pair``, ``pair/method``).
    """

    def __init__(self, suite: Suite, out: Path, results: Path | None = None, only: list[str] | None = None) -> None:
        self.suite = suite
        self.out = Path(out)
        self.results = Path(results) if results is not None else self.out / "results"
        self.cells = plan_cells(suite, only)
        self._recipes: dict[str, dict[str, Any]] = {}  # each recipe read once per Bench
        self._check_all()

    # ---------------------------------------------------------------- configs
    def _check_all(self) -> None:
        """Build and validate every cell's config (names, params) before anything trains."""
        for cell in self.cells:
            raw = self._raw(cell, teacher_checkpoint=None)
            check_config(check_cell_config(raw, cell.id))

    def _raw(self, cell: Cell, teacher_checkpoint: str | None) -> dict[str, Any]:
        if cell.kind == "teacher":
            return teacher_config(self.suite, cell.pair)
        assert cell.seed is not None  # a student's cell has a seed
        return student_config(
            self.suite, cell.pair, cell.method, cell.seed, teacher_checkpoint, self._tuned(cell)[1], self._read
        )

    def raw_default(self, cell: Cell, teacher_checkpoint: str | None) -> dict[str, Any]:
        """The cell's raw config with the method's default (untuned) values."""
        assert cell.seed is not None  # a student's cell has a seed
        return student_config(self.suite, cell.pair, cell.method, cell.seed, teacher_checkpoint, read=self._read)

    def _read(self, recipe: str) -> dict[str, Any]:
        if recipe not in self._recipes:
            self._recipes[recipe] = read_recipe(recipe)
        return self._recipes[recipe]

    def _tuned(self, cell: Cell) -> tuple[str, dict[str, Any]]:
        if self.suite.hp != "tuned" or cell.kind != "method":
            return "default", {}
        values = tuned_values(self.results, cell.pair, cell.method)
        return ("tuned", values) if values is not None else ("default", {})

    def teacher_info(self, pair: str) -> dict[str, Any] | None:
        """The pair's teacher: ``{"model", "hash", "last_acc", "train_seconds", "checkpoint"}``,
        None while its cell has not finished."""
        spec = self.suite.pairs[pair].teacher
        if spec.get("checkpoint"):
            path = Path(spec["checkpoint"]).expanduser()
            payload = read_export(path)
            recorded = payload.get("result")
            recorded = recorded if isinstance(recorded, dict) else {}
            return {
                "model": spec.get("name"),
                "hash": state_hash(payload["state_dict"]),
                "checkpoint": str(path),
                "last_acc": recorded.get("last_acc"),
                "train_seconds": 0.0,
            }
        res = read_result(Cell(pair, "teacher").result_path(self.results))
        if res is None or res.get("status") != "done" or res.get("key") != self.key(Cell(pair, "teacher")):
            return None
        copy = Cell(pair, "teacher").result_path(self.results).with_suffix(".pt")  # kept with the results
        return {
            "model": res.get("student"),
            "hash": res.get("hash"),
            "checkpoint": str(copy.resolve()) if copy.is_file() else res.get("exported"),
            "last_acc": res.get("last_acc"),
            "train_seconds": res.get("train_seconds"),
        }

    def key(self, cell: Cell, teacher: dict[str, Any] | None = None) -> str:
        """The cell's key (a student cell needs its pair's ``teacher``)."""
        raw = self._raw(cell, teacher["checkpoint"] if teacher else None)
        return cell_key(check_cell_config(raw, cell.id), teacher["hash"] if teacher else None)

    def task(self, cell: Cell, teachers: dict[str, dict[str, Any] | None] | None = None) -> CellTask | None:
        """The cell's task, or None while it waits for its teacher (``teachers``: the pairs'
        :meth:`teacher_info`, when the caller has read them already)."""
        teacher = None
        if cell.kind != "teacher":
            teacher = teachers[cell.pair] if teachers is not None else self.teacher_info(cell.pair)
            if teacher is None and self._needs_teacher(cell):
                return None
        raw = self._raw(cell, teacher["checkpoint"] if teacher else None)
        uses = cell.kind == "method" and self._needs_teacher(cell)
        hp, tuned = self._tuned(cell)
        key = cell_key(check_cell_config(raw, cell.id), teacher["hash"] if uses and teacher else None)
        public = {k: v for k, v in (teacher or {}).items() if k != "checkpoint"} if uses else None
        return CellTask(
            cell,
            self.suite.name,
            raw,
            key,
            str(cell.work_dir(self.out)),
            str(cell.result_path(self.results)),
            hp,
            tuned,
            public,
        )

    def _needs_teacher(self, cell: Cell) -> bool:
        return (
            cell.kind == "method"
            and self.suite.method(cell.method).teacher == "pair"
            and "teacher" in self._raw(cell, None)
        )

    # ---------------------------------------------------------------- state
    def status(self) -> Status:
        """Done, stale, to run and waiting cells (reads only the result files)."""
        st = Status()
        teachers = {pair: self.teacher_info(pair) for pair in {c.pair for c in self.cells}}  # once per pair
        for cell in self.cells:
            task = self.task(cell, teachers)
            res = read_result(cell.result_path(self.results))
            if task is None:
                (st.stale if res is not None else st.waiting).append(cell)
            elif res is None:
                st.todo.append(cell)
            elif res.get("key") != task.key:
                st.stale.append(cell)
            else:
                st.done.append(cell)
        return st

    def finished_results(self) -> list[dict[str, Any]]:
        """The result of every finished, current cell (the tables' only input)."""
        # done cells have a result:
        return [read_result(c.result_path(self.results)) for c in self.status().done]  # type: ignore[misc]

    # ---------------------------------------------------------------- running
    def run(
        self, executor: str = "serial", jobs: int = 1, cluster: str | None = None, slurm: dict[str, Any] | None = None
    ) -> Status:
        """Run the teachers, then every other cell that is not finished with its current key."""
        log.info("%s: %s", self.suite.name, "\n".join(self.status().lines()))
        failures = self.run_teachers(executor, jobs, cluster, slurm)
        st = self.status()
        tasks = [t for t in (self.task(c) for c in st.todo + st.stale if c.kind != "teacher") if t is not None]
        failures += self._run(tasks, executor, jobs, cluster, slurm)
        st = self.status()
        st.failed = failures
        return st

    def run_teachers(
        self, executor: str = "serial", jobs: int = 1, cluster: str | None = None, slurm: dict[str, Any] | None = None
    ) -> list[tuple[Cell, str]]:
        """Train the pairs' teachers that are not finished with their current key."""
        st = self.status()
        cells = [c for c in st.todo + st.stale if c.kind == "teacher"]
        return self._run([t for t in (self.task(c) for c in cells) if t is not None], executor, jobs, cluster, slurm)

    def _run(
        self, tasks: list[CellTask], executor: str, jobs: int, cluster: str | None, slurm: dict[str, Any] | None
    ) -> list[tuple[Cell, str]]:
        failures = []
        for task in tasks:
            self._event(task, "queued")
        for i, (task, result, exc) in enumerate(
            run_tasks(tasks, executor, jobs, self.out / "submitit", cluster, slurm), 1
        ):
            if exc is not None:
                why = str(exc) if isinstance(exc, DarkKnowledgeError) else f"{type(exc).__name__}: {exc}"
                self._event(task, "failed", reason=why)
                log.error("[%d/%d] %s failed: %s", i, len(tasks), task.cell.id, why)
                failures.append((task.cell, why))
                continue
            assert result is not None  # no exception: a result
            self._event(task, "end", status=result["status"])
            acc = result.get("last_acc")
            log.info(
                "[%d/%d] %s: %s (%.1f s)",
                i,
                len(tasks),
                task.cell.id,
                f"{acc:.2f}" if acc is not None else result["status"],
                result.get("wall_seconds", 0.0),
            )
        return failures

    def _event(self, task: CellTask, event: str, **extra: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "cell": task.cell.id,
            "key": task.key,
            "event": event,
            **extra,
        }
        with open(self.out / "bench.jsonl", "a", encoding="utf-8") as f:  # append-only log of this process
            f.write(json.dumps(line) + "\n")
