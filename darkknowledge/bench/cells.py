"""The cells of a suite and the exact config each one trains.

A cell is one training run: a pair's teacher (once per pair), or, per seed, the student alone
(``baseline``), ``kd`` or another method. Its config is built from the method's recipe with the
suite's data, the pair's student and teacher and the suite's budget put in place, so every
student cell of a pair trains with the same data, epochs, optimizer and augmentation, and the
baseline and every method of a seed start from the same initialisation (the seed builds the
student). A cell's *key* hashes its resolved config (the teacher by its weights' hash, not its
path): a finished cell whose key no longer matches (a recipe, the budget or the teacher changed)
is stale.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darkknowledge.bench.suite import MIXING_OVERRIDES, Suite, forbidden_override
from darkknowledge.config import RunConfig, deep_merge, read_recipe, validate_config
from darkknowledge.errors import ConfigError

BASELINE = "ce"
"""The method name of the student trained alone with cross-entropy."""


@dataclass(frozen=True)
class Cell:
    """One training run of a suite.

    Attributes:
        pair: The pair's name.
        method: ``teacher``, ``ce`` (the student alone) or a method name.
        seed: The seed (None for the teacher).
    """

    pair: str
    method: str
    seed: int | None = None

    @property
    def kind(self) -> str:
        """``teacher``, ``baseline`` or ``method``."""
        return {"teacher": "teacher", BASELINE: "baseline"}.get(self.method, "method")

    @property
    def id(self) -> str:
        """``pair/method/sSEED`` (``pair/teacher`` for the teacher)."""
        return f"{self.pair}/teacher" if self.seed is None else f"{self.pair}/{self.method}/s{self.seed}"

    def result_path(self, results: Path) -> Path:
        """The cell's result file under the results folder."""
        return results / f"{self.id}.json"

    def work_dir(self, out: Path) -> Path:
        """The cell's run folder (checkpoints, metrics) under the bench folder."""
        return out / "cells" / self.id


@dataclass
class CellTask:
    """Everything a worker needs to run one cell (plain data: it crosses process boundaries).

    Attributes:
        cell: The cell.
        suite: The suite's name.
        config: The raw config the cell trains (teacher checkpoint path filled in).
        key: The cell's key (see the module docstring).
        work_dir: Its run folder.
        result_path: Where its result JSON goes.
        hp: ``default`` or ``tuned``.
        tuned: The tuned values used (empty for default).
        teacher: ``{"model", "hash", "last_acc", "train_seconds"}`` of the pair's teacher (None for
            the teacher cell and the baseline).
    """

    cell: Cell
    suite: str
    config: dict[str, Any]
    key: str
    work_dir: str
    result_path: str
    hp: str = "default"
    tuned: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] | None = None


def plan_cells(suite: Suite, only: list[str] | None = None) -> list[Cell]:
    """Every cell of the suite: the teachers first, then per pair and seed the baseline, ``kd``
    and the other methods. ``only``: keep the cells whose id starts with one of these prefixes
    (``pair``, ``pair/method``); the teachers they need are always kept."""
    cells = [Cell(pair, "teacher") for pair in suite.pairs if not suite.pairs[pair].teacher.get("checkpoint")]
    for pair in suite.pairs:
        for seed in suite.seeds:
            cells.append(Cell(pair, BASELINE, seed))
            cells += [Cell(pair, m, seed) for m in suite.method_names() if pair in suite.pairs_of(m)]
    if only:
        keep = [
            c
            for c in cells
            if c.kind != "teacher" and any(c.id == p or c.id.startswith(p.rstrip("/") + "/") for p in only)
        ]
        if not keep:
            raise ConfigError(
                f"--only {' '.join(only)}: no cell matches; cells are named PAIR/METHOD/sSEED, "
                f"pairs: {', '.join(suite.pairs)}; methods: ce, {', '.join(suite.method_names())}"
            )
        pairs = {c.pair for c in keep}
        cells = [c for c in cells if c.kind == "teacher" and c.pair in pairs] + keep
    return cells


def _data(suite: Suite, pair: str) -> dict[str, Any]:
    own = suite.pairs[pair].data
    base = dict(suite.data)
    if own.get("name", base.get("name")) != base.get("name"):  # another dataset: the suite's params are not its
        base = {k: v for k, v in base.items() if k not in ("name", "params", "root")}
    data = deep_merge(base, own)
    augment = _budget(suite, pair).get("augment")
    if augment:
        data["augment"] = augment
    return data


def _budget(suite: Suite, pair: str) -> dict[str, Any]:
    return deep_merge(suite.budget.model_dump(), suite.pairs[pair].budget)


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {part!r} is not a mapping in the recipe")
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)


def teacher_config(suite: Suite, pair: str) -> dict[str, Any]:
    """The raw config of the pair's teacher cell (``dk train --model teacher``)."""
    p = suite.pairs[pair]
    teacher = dict(p.teacher)
    teacher.setdefault("seed", 0)
    return {
        "name": f"{suite.name}-{pair}-teacher",
        "seed": 0,
        "seeds": [0],
        "data": _data(suite, pair),
        "teacher": teacher,
        "student": dict(p.student),
        "losses": {"ce": {}},
        "train": _budget(suite, pair).get("train", {}),
    }


def student_config(
    suite: Suite,
    pair: str,
    method: str,
    seed: int,
    teacher_checkpoint: str | None,
    tuned: dict[str, Any] | None = None,
    read: Callable[[str], dict[str, Any]] = read_recipe,
) -> dict[str, Any]:
    """The raw config of a student cell: the baseline (``ce``) or a method.

    The method's recipe keeps its losses, scheme, cache and extra teachers; the suite sets the
    data, the student, the teacher (the pair's, from ``teacher_checkpoint``, when the recipe has
    a ``teacher:``), the training budget, the seed and the name. The method's overrides, the
    pair's overrides of the method, then tuned values are applied to the recipe first. ``read``
    reads a recipe (e.g. a caching reader).
    """
    p = suite.pairs[pair]
    mixing: dict[str, Any] = {}  # the method's own mixing (function matching), on the suite's data
    if method == BASELINE:
        raw: dict[str, Any] = {"losses": {"ce": {}}}
    else:
        m = suite.method(method)
        raw = copy.deepcopy(read(suite.recipe_path(method)))
        for dotted, value in {**m.overrides, **p.overrides.get(method, {}), **(tuned or {})}.items():
            if forbidden_override(dotted):
                raise ConfigError(f"{pair}/{method}: {dotted} is the suite's to set, not the method's")
            if dotted in MIXING_OVERRIDES:
                mixing[dotted.rsplit(".", 1)[1]] = value
            else:
                _set_path(raw, dotted, value)
    data = _data(suite, pair)
    if mixing:
        data["augment"] = {**data.get("augment", {}), **mixing}
    raw.update(
        {
            "name": f"{suite.name}-{pair}-{method}",
            "seed": seed,
            "seeds": [seed],
            "data": data,
            "student": dict(p.student),
            "train": _budget(suite, pair).get("train", {}),
        }
    )
    if "teacher" in raw and method != BASELINE and suite.method(method).teacher == "pair":
        teacher = {k: v for k, v in p.teacher.items() if k in ("name", "params", "input")}  # input: its view
        if teacher_checkpoint is not None:
            teacher["checkpoint"] = teacher_checkpoint
        raw["teacher"] = teacher
    raw.pop("description", None)
    return raw


def check_cell_config(raw: dict[str, Any], where: str) -> RunConfig:
    """Validate a cell's raw config; errors name the cell."""
    try:
        return validate_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def cell_key(cfg: RunConfig, teacher_hash: str | None) -> str:
    """The cell's key: its resolved config, the teacher by the hash of its weights."""
    dump = cfg.model_dump(mode="json", exclude_defaults=True)  # a new option with a default keeps cells current
    dump.pop("name", None)
    if dump.get("teacher") and dump["teacher"].get("checkpoint"):
        dump["teacher"]["checkpoint"] = teacher_hash
    text = json.dumps(dump, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    """The first 16 hex digits of a file's SHA-256 (a teacher checkpoint's identity)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
