"""``dk tune SUITE``: every method of a suite tuned with the same trial budget, on validation data.

Per (pair, method) the method's declared search space (its losses' ``search_space``, or the
suite's ``tune:`` ranges for that method) is searched with ``suite.trials`` trials, each one a
training run of the method's cell (first seed of the suite) whose evaluation split is the
validation split carved from the training data (``data.holdout=val``): the test split is never
read. The chosen values go to ``<results>/tuned/<pair>/<method>.json`` (values, every trial,
the budget) and a loadable recipe beside it; a suite with ``hp: tuned`` trains its cells with
them, and its tables mark each cell ``tuned`` or ``default``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from darkknowledge.bench.cells import BASELINE, Cell, check_cell_config
from darkknowledge.engine.checkpoint import atomic_write_text
from darkknowledge.errors import ConfigError

log = logging.getLogger(__name__)


def tuned_path(results: Path, pair: str, method: str) -> Path:
    """Where the tuned values of (pair, method) live."""
    return Path(results) / "tuned" / pair / f"{method}.json"


def tuned_values(results: Path, pair: str, method: str) -> dict[str, Any] | None:
    """The tuned dotted overrides of (pair, method), or None when it was not tuned."""
    path = tuned_path(results, pair, method)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return dict(data["values"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable tuned values ({exc}); delete it and run `dk tune` again") from None


def tune_suite(
    bench: Any,
    trials: int | None = None,
    sampler_seed: int = 0,
    progress: bool = False,
    executor: str = "serial",
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Tune every method of ``bench``'s cells (every pair it runs on) with the same trial budget.

    Args:
        bench: A :class:`darkknowledge.bench.runner.Bench` (its ``only`` filter applies).
        trials: Trials per (pair, method); default the suite's ``trials``. Every method gets the
            same number.
        sampler_seed: The search's seed.
        progress: Progress bars.
        executor: How the teachers are trained first (see ``dk bench``).
        jobs: Parallel teacher cells.

    Returns:
        One summary per (pair, method): ``{"pair", "method", "values", "score", "trials"}``.
    """
    from darkknowledge.bench.spaces import space_for, space_to_dict, suite_space
    from darkknowledge.bench.tune import tune, write_tuned_recipe

    suite = bench.suite
    n = trials if trials is not None else suite.trials
    if n < 1:
        raise ConfigError(f"--trials {n}: expected 1 or more")
    teachers = [c for c in bench.cells if c.kind == "teacher"]
    if teachers:  # the students' teachers are trained as `dk bench` trains them (their cells are reused)
        failed = bench.run_teachers(executor, jobs)
        if failed:
            raise ConfigError("dk tune: teacher cell(s) failed: " + "; ".join(f"{c.id}: {why}" for c, why in failed))
    seed = suite.seeds[0]
    targets = sorted({(c.pair, c.method) for c in bench.cells if c.kind == "method"})
    summaries = []
    for pair, method in targets:
        cell = Cell(pair, method, seed)
        teacher = bench.teacher_info(pair)
        raw = bench.raw_default(cell, teacher["checkpoint"] if teacher else None)
        cfg = check_cell_config(raw, cell.id)
        declared = suite.method(method).tune
        space = suite_space(declared) if declared else space_for(cfg)
        if not space:
            log.info("%s/%s: nothing to tune (no search space declared)", pair, method)
            continue
        out = bench.out / "tune" / pair / method
        result = tune(cfg, space, n, out, seed=seed, sampler_seed=sampler_seed, progress=progress)
        path = tuned_path(bench.results, pair, method)
        record = {
            "pair": pair,
            "method": method,
            "values": result.best,
            "score": result.best_score,
            "trials": result.to_dict()["trials"],
            "n_trials": len(result.trials),
            "budget": n,
            "seed": seed,
            "selected_on": "validation split (data.holdout=val); the test split was not read",
            "space": space_to_dict(space),
        }
        text = json.dumps(record, indent=1, sort_keys=True)
        atomic_write_text(text, path)
        write_tuned_recipe(path.with_suffix(".yaml"), cfg, result)
        summaries.append(
            {
                "pair": pair,
                "method": method,
                "values": result.best,
                "score": result.best_score,
                "trials": len(result.trials),
            }
        )
        log.info(
            "%s/%s: %s -> validation %.2f (%d trials)", pair, method, result.best, result.best_score, len(result.trials)
        )
    if not summaries and not any(m != BASELINE for _, m in targets):
        raise ConfigError("dk tune: the selected cells hold no method to tune (only the student alone)")
    return summaries
