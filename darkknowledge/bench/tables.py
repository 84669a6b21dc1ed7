"""Benchmark tables: per-cell results summarized per (pair, method), written as CSV and JSON
(Markdown: :mod:`darkknowledge.bench.markdown`).

:func:`summarize` is a pure function of the cells (one dict per pair × method × seed, as the
runner writes them): every number in a table is recomputed from them. The headline is the
last-epoch test accuracy, mean ± sample std over the listed seeds; ``best`` is the test
accuracy at the epoch best on the validation split (rows say when it was selected on the test
split); Δ is the paired difference to the same-budget baseline (and to vanilla KD) with a
t-interval over the seeds both hold, and ``wins`` counts the seeds where the method is ahead.
Undefined numbers (no cells, fewer than two paired seeds) are ``None``, so rows round-trip
through JSON exactly.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from darkknowledge.errors import ConfigError
from darkknowledge.stats import mean_std, paired_ci

KINDS = ("teacher", "baseline", "method")
STATUSES = ("done", "n/a")
_DELTA = ("mean", "lo", "hi", "std", "n", "wins", "ties")

#: Every row has exactly these keys (the CSV columns, in this order).
ROW_FIELDS: tuple[str, ...] = (
    "suite",
    "pair",
    "method",
    "kind",
    "parent",
    "student",
    "hp",
    "status",
    "seeds",
    "n",
    "last_values",
    "last_mean",
    "last_std",
    "best_values",
    "best_mean",
    "best_std",
    "best_n",
    "best_selected_on",
    "ci_level",
    *(f"d_baseline_{k}" for k in _DELTA),
    *(f"d_kd_{k}" for k in _DELTA),
    "train_s_mean",
    "teacher_s_mean",
    "params",
    "extra_params",
    "teacher_model",
    "teacher_hash",
    "teacher_acc",
    "na",
    "published_value",
    "published_protocol",
)
_LISTS = ("seeds", "last_values", "best_values", "na")


def _num(x: Any) -> float | None:
    """``x`` as a float, or ``None`` when missing or not finite."""
    if x is None or isinstance(x, bool):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _check(cells: Sequence[Mapping]) -> None:
    """One clear error for a malformed cell or a (pair, method, seed) given twice."""
    seen: set[tuple] = set()
    for i, c in enumerate(cells):
        if not isinstance(c, Mapping):
            raise ConfigError(f"bench cell #{i} is a {type(c).__name__}, expected a dict of results")
        for name in ("pair", "kind", "status"):
            if name not in c:
                raise ConfigError(
                    f"bench cell #{i} ({dict(c)!r:.200}) has no {name!r}; every cell names its "
                    "pair, kind (teacher|baseline|method) and status (done|n/a)"
                )
        where = f"bench cell #{i} (pair {c['pair']!r}, method {c.get('method')!r}, seed {c.get('seed')!r})"
        if c["kind"] not in KINDS:
            raise ConfigError(f"{where}: kind={c['kind']!r}; valid kinds: {', '.join(KINDS)}")
        if c["status"] not in STATUSES:
            raise ConfigError(f"{where}: status={c['status']!r}; valid statuses: {', '.join(STATUSES)}")
        if c["kind"] != "teacher" and not c.get("method"):
            raise ConfigError(f"{where}: a {c['kind']} cell needs a method name")
        if c["status"] == "done" and _num(c.get("last_acc")) is None:
            raise ConfigError(
                f"{where}: status 'done' but last_acc={c.get('last_acc')!r}; a finished cell "
                "has a finite last-epoch accuracy (mark a failed cell 'n/a' with a reason)"
            )
        key = (c["pair"], _method_of(c), c.get("seed"))
        if key in seen:
            raise ConfigError(f"{where} appears twice; each (pair, method, seed) is one cell")
        seen.add(key)


def _method_of(cell: Mapping) -> str:
    return "teacher" if cell["kind"] == "teacher" else str(cell["method"])


def _one_or_mixed(values: list) -> Any:
    """The single distinct value, ``"mixed"`` for several, ``None`` for none."""
    distinct = list(dict.fromkeys(v for v in values if v is not None))
    return distinct[0] if len(distinct) == 1 else ("mixed" if distinct else None)


def _same_or_mean(values: list) -> float | int | None:
    """The value all share (kept an int), else their mean; ``None`` for none."""
    xs = [v for v in values if _num(v) is not None]
    if not xs:
        return None
    return xs[0] if all(x == xs[0] for x in xs) else mean_std(xs)[0]


def _blank(pair: str, method: str, kind: str, level: float) -> dict:
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
    row.update({k: [] for k in _LISTS})
    row.update(pair=pair, method=method, kind=kind, n=0, ci_level=level)
    return row


def _fill_stats(row: dict, seeds: list, last: list[float], best: list[float | None]) -> None:
    row["seeds"], row["n"], row["last_values"], row["best_values"] = seeds, len(seeds), last, best
    lm, ls = mean_std(last)
    row["last_mean"], row["last_std"] = _num(lm), _num(ls)
    bs = [b for b in best if b is not None]
    bm, bsd = mean_std(bs)
    row["best_mean"], row["best_std"], row["best_n"] = _num(bm), _num(bsd), len(bs)


def _fill_delta(row: dict, prefix: str, values: Mapping[Hashable, float], ref: Mapping[Hashable, float]) -> None:
    ci = paired_ci(values, ref, level=row["ci_level"])
    for k, src in zip(_DELTA, ("mean_diff", "lo", "hi", "std_diff", "n", "wins", "ties")):
        row[f"{prefix}_{k}"] = ci[src] if k in ("n", "wins", "ties") else _num(ci[src])


def _cell_row(pair: str, method: str, cells: list[Mapping], level: float) -> dict:
    """The row of one (pair, method) from its cells (done and n/a)."""
    row = _blank(pair, method, cells[0]["kind"], level)
    done = [c for c in cells if c["status"] == "done"]
    row["suite"] = _one_or_mixed([c.get("suite") for c in cells])
    row["student"] = _one_or_mixed([c.get("student") for c in cells])
    row["hp"] = _one_or_mixed([c.get("hp") for c in (done or cells)])
    row["status"] = "done" if len(done) == len(cells) else ("n/a" if not done else "partial")
    _fill_stats(
        row,
        [c.get("seed") for c in done],
        [float(c["last_acc"]) for c in done],
        [_num(c.get("best_acc")) for c in done],
    )
    selected = [c.get("best_selected_on") for c in done if _num(c.get("best_acc")) is not None]
    row["best_selected_on"] = "test" if "test" in selected else ("val" if selected else None)
    if done:
        row["train_s_mean"] = _num(mean_std([_num(c.get("train_seconds")) or 0.0 for c in done])[0])
        row["teacher_s_mean"] = _num(mean_std([_num(c.get("teacher_seconds")) or 0.0 for c in done])[0])
        row["params"] = _same_or_mean([c.get("params") for c in done])
        row["extra_params"] = _same_or_mean([c.get("extra_params") for c in done])
    teachers = [c["teacher"] for c in cells if isinstance(c.get("teacher"), Mapping)]
    if row["kind"] == "teacher":
        row["teacher_model"] = _one_or_mixed([t.get("model") for t in teachers])
        row["teacher_hash"] = _one_or_mixed([t.get("hash") for t in teachers])
        row["teacher_acc"] = row["last_mean"]
    elif teachers:
        row["teacher_model"] = _one_or_mixed([t.get("model") for t in teachers])
        row["teacher_hash"] = ",".join(dict.fromkeys(str(t["hash"]) for t in teachers if t.get("hash"))) or None
        row["teacher_acc"] = _num(
            next((t.get("last_acc") for t in teachers if _num(t.get("last_acc")) is not None), None)
        )
    row["na"] = [
        {"seed": c.get("seed"), "reason": str(c.get("reason") or "no reason given")}
        for c in cells
        if c["status"] == "n/a"
    ]
    return row


def _member_rows(parent: dict, cells: list[Mapping], level: float) -> list[dict]:
    """One row per member role (peers, heads) of a scheme's done cells: mean ± std only."""
    by_role: dict[str, tuple[list, list]] = {}
    for c in cells:
        if c["status"] != "done":
            continue
        for m in c.get("members") or []:
            acc = _num(m.get("last_acc"))
            if acc is not None:
                seeds, values = by_role.setdefault(str(m.get("role", "member")), ([], []))
                seeds.append(c.get("seed"))
                values.append(acc)
    rows = []
    for role, (seeds, values) in by_role.items():
        row = _blank(parent["pair"], f"{parent['method']}:{role}", "member", level)
        row.update(suite=parent["suite"], parent=parent["method"], hp=parent["hp"], status="done")
        _fill_stats(row, seeds, values, [None] * len(values))
        rows.append(row)
    return rows


def _fill_teacher(row: dict, by_method: Mapping[str, list[Mapping]]) -> None:
    """A teacher row's model and hash from the students' cells when its own cell does not carry them."""
    used = [
        c["teacher"]
        for cs in by_method.values()
        for c in cs
        if c["kind"] != "teacher" and isinstance(c.get("teacher"), Mapping)
    ]
    if row["teacher_hash"] is None:
        row["teacher_hash"] = _one_or_mixed([t.get("hash") for t in used])
    if row["teacher_model"] is None:
        row["teacher_model"] = _one_or_mixed([t.get("model") for t in used])


def _seed_values(rows: list[dict]) -> dict:
    """Seed -> last-epoch accuracy over the done cells of ``rows``."""
    return {s: v for r in rows for s, v in zip(r["seeds"], r["last_values"])}


def summarize(
    cells: Sequence[Mapping], published: Mapping[tuple[str, str], Mapping] | None = None, level: float = 0.95
) -> list[dict]:
    """One row per (pair, method), recomputed from the per-cell results.

    Args:
        cells: Per-cell result dicts (pair, method, kind, seed, status, last_acc, ...).
        published: ``(pair, method) -> {"value": 73.33, "protocol": "..."}`` numbers from papers,
            shown next to ours with their protocol; ``(pair, "teacher")`` for a teacher.
        level: Confidence level of the paired intervals.

    Returns:
        Rows with the keys of :data:`ROW_FIELDS`, per pair in order of first appearance: the
        teacher, the baseline(s), ``kd``, the other methods, each scheme's member rows right
        after it.

    Raises:
        ConfigError: A malformed cell, a (pair, method, seed) given twice, or a published
            entry without a ``value``.
    """
    _check(cells)
    groups: dict[str, dict[str, list[Mapping]]] = {}
    for c in cells:
        groups.setdefault(str(c["pair"]), {}).setdefault(_method_of(c), []).append(c)
    rank = {"teacher": 0, "baseline": 1}
    rows: list[dict] = []
    for pair, by_method in groups.items():
        order = sorted(by_method, key=lambda m: rank.get(by_method[m][0]["kind"], 3 if m != "kd" else 2))
        made = [_cell_row(pair, m, by_method[m], level) for m in order]
        base = _seed_values([r for r in made if r["kind"] == "baseline"])
        kd = _seed_values([r for r in made if r["kind"] == "method" and r["method"] == "kd"])
        for row in made:
            if row["kind"] == "teacher":
                _fill_teacher(row, by_method)
                rows.append(row)
                continue
            own = _seed_values([row])
            if row["kind"] != "baseline" and base:
                _fill_delta(row, "d_baseline", own, base)
            if row["method"] != "kd" and kd:
                _fill_delta(row, "d_kd", own, kd)
            rows.append(row)
            rows.extend(_member_rows(row, by_method[row["method"]], level))
    for row in rows:
        entry = (published or {}).get((row["pair"], row["method"]))
        if entry is not None:
            if not isinstance(entry, Mapping) or _num(entry.get("value")) is None:
                raise ConfigError(
                    f"published[({row['pair']!r}, {row['method']!r})]={entry!r}: expected "
                    "{'value': <accuracy>, 'protocol': '<how it was measured>'}"
                )
            row["published_value"] = float(entry["value"])
            row["published_protocol"] = str(entry.get("protocol") or "protocol not stated")
    return rows


# ---------------------------------------------------------------- writers


def to_json(rows: Sequence[Mapping]) -> str:
    """Rows as JSON: full precision, per-seed values included; ``json.loads`` gives the rows back."""
    return json.dumps(list(rows), indent=2, allow_nan=False)


def to_csv(rows: Sequence[Mapping]) -> str:
    """Rows as CSV with the columns of :data:`ROW_FIELDS`; lists are JSON text, ``None`` is empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(ROW_FIELDS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                f: json.dumps(row.get(f)) if f in _LISTS else ("" if row.get(f) is None else row.get(f))
                for f in ROW_FIELDS
            }
        )
    return buf.getvalue()
