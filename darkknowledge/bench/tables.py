"""Benchmark tables: per-cell results summarized per (pair, method), written as Markdown, CSV, JSON.

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

from darkknowledge.bench.stats import mean_std, paired_ci
from darkknowledge.errors import ConfigError

KINDS = ("teacher", "baseline", "method")
STATUSES = ("done", "n/a")
_DELTA = ("mean", "lo", "hi", "std", "n", "wins", "ties")

#: Every row has exactly these keys (the CSV columns, in this order).
ROW_FIELDS: tuple[str, ...] = (
    "suite", "pair", "method", "kind", "parent", "student", "hp", "status", "seeds", "n",
    "last_values", "last_mean", "last_std", "best_values", "best_mean", "best_std", "best_n",
    "best_selected_on", "ci_level",
    *(f"d_baseline_{k}" for k in _DELTA), *(f"d_kd_{k}" for k in _DELTA),
    "train_s_mean", "teacher_s_mean", "params", "extra_params",
    "teacher_model", "teacher_hash", "teacher_acc", "na", "published_value", "published_protocol",
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
        for key in ("pair", "kind", "status"):
            if key not in c:
                raise ConfigError(f"bench cell #{i} ({dict(c)!r:.200}) has no {key!r}; every cell names its "
                                  "pair, kind (teacher|baseline|method) and status (done|n/a)")
        where = f"bench cell #{i} (pair {c['pair']!r}, method {c.get('method')!r}, seed {c.get('seed')!r})"
        if c["kind"] not in KINDS:
            raise ConfigError(f"{where}: kind={c['kind']!r}; valid kinds: {', '.join(KINDS)}")
        if c["status"] not in STATUSES:
            raise ConfigError(f"{where}: status={c['status']!r}; valid statuses: {', '.join(STATUSES)}")
        if c["kind"] != "teacher" and not c.get("method"):
            raise ConfigError(f"{where}: a {c['kind']} cell needs a method name")
        if c["status"] == "done" and _num(c.get("last_acc")) is None:
            raise ConfigError(f"{where}: status 'done' but last_acc={c.get('last_acc')!r}; a finished cell "
                              "has a finite last-epoch accuracy (mark a failed cell 'n/a' with a reason)")
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
    row: dict[str, Any] = {f: None for f in ROW_FIELDS}
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
    _fill_stats(row, [c.get("seed") for c in done], [float(c["last_acc"]) for c in done],
                [_num(c.get("best_acc")) for c in done])
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
        row["teacher_acc"] = _num(next((t.get("last_acc") for t in teachers if _num(t.get("last_acc")) is not None),
                                       None))
    row["na"] = [{"seed": c.get("seed"), "reason": str(c.get("reason") or "no reason given")}
                 for c in cells if c["status"] == "n/a"]
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
    used = [c["teacher"] for cs in by_method.values() for c in cs
            if c["kind"] != "teacher" and isinstance(c.get("teacher"), Mapping)]
    if row["teacher_hash"] is None:
        row["teacher_hash"] = _one_or_mixed([t.get("hash") for t in used])
    if row["teacher_model"] is None:
        row["teacher_model"] = _one_or_mixed([t.get("model") for t in used])


def _seed_values(rows: list[dict]) -> dict:
    """Seed -> last-epoch accuracy over the done cells of ``rows``."""
    return {s: v for r in rows for s, v in zip(r["seeds"], r["last_values"])}


def summarize(cells: Sequence[Mapping], published: Mapping[tuple[str, str], Mapping] | None = None,
              level: float = 0.95) -> list[dict]:
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
                raise ConfigError(f"published[({row['pair']!r}, {row['method']!r})]={entry!r}: expected "
                                  "{'value': <accuracy>, 'protocol': '<how it was measured>'}")
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
        writer.writerow({f: json.dumps(row.get(f)) if f in _LISTS else ("" if row.get(f) is None else row.get(f))
                         for f in ROW_FIELDS})
    return buf.getvalue()


def _esc(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _pm(mean: float | None, std: float | None, n: int | None = None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f} (n=1)" if n == 1 else f"{mean:.2f} ± {std or 0.0:.2f}"


def _delta(row: Mapping, prefix: str) -> str:
    n, mean = row.get(f"{prefix}_n"), row.get(f"{prefix}_mean")
    if n is None or not row.get("n"):
        return "—"
    if n == 0 or mean is None:
        return "no paired seeds"
    if row.get(f"{prefix}_lo") is None:
        return f"{mean:+.2f} (1 seed)"
    return f"{mean:+.2f} [{row[f'{prefix}_lo']:+.2f}, {row[f'{prefix}_hi']:+.2f}]"


def _wins(row: Mapping, prefix: str) -> str:
    n = row.get(f"{prefix}_n")
    if not n:
        return "—"
    ties = row.get(f"{prefix}_ties") or 0
    return f"{row[f'{prefix}_wins']}/{n}" + (f" ({ties} tie{'s' * (ties > 1)})" if ties else "")


def _count(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.0f}" if abs(x) < 1e4 else (f"{x / 1e3:.1f}k" if abs(x) < 1e6 else f"{x / 1e6:.2f}M")


def _secs(x: float | None) -> str:
    return "—" if x is None else (f"{x:.1f}" if x < 1000 else f"{x:,.0f}")


def _acc(row: Mapping) -> str:
    if not row["n"]:
        return "n/a"
    text = _pm(row["last_mean"], row["last_std"], row["n"])
    return text + (f" (+{len(row['na'])} n/a)" if row["na"] else "")


def _name(row: Mapping) -> str:
    if row["kind"] == "teacher" and row["teacher_model"]:
        return _esc(f"teacher ({row['teacher_model']})")
    return _esc(row["method"])


def _by_pair(rows: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    out: dict[str, list[Mapping]] = {}
    for r in rows:
        out.setdefault(str(r["pair"]), []).append(r)
    return out


def _header(pair: str, rows: list[Mapping]) -> list[str]:
    teacher = next((r for r in rows if r["kind"] == "teacher"), None) or next(
        (r for r in rows if r["teacher_model"]), None)
    student = next((r["student"] for r in rows if r["kind"] != "teacher" and r["student"]), None)
    suite = next((r["suite"] for r in rows if r["suite"]), None)
    lines = [f"### {_esc(pair)}" + (f" (suite `{suite}`)" if suite else ""), ""]
    if teacher is None:
        lines.append("Teacher: none recorded.")
    else:
        acc = teacher["last_mean"] if teacher["kind"] == "teacher" else teacher["teacher_acc"]
        acc_text = "accuracy not recorded" if acc is None else f"{acc:.2f}% last-epoch test accuracy"
        lines.append(f"Teacher: **{_esc(teacher['teacher_model'])}**, {acc_text}, hash "
                     f"`{teacher['teacher_hash'] or 'unknown'}`."
                     + (f" Student: **{_esc(student)}**." if student else ""))
    level = rows[0]["ci_level"] or 0.95
    protocol = ("Protocol: headline = last-epoch test accuracy, mean ± sample std over the listed seeds; "
                "best = test accuracy at the epoch best on the validation split; Δ = paired difference "
                f"(row − reference) with {level:.0%} t-CI over seeds; wins = seeds where the row is ahead, out "
                "of the paired seeds; costs are means per seed.")
    lines += ["", protocol, ""]
    return lines


def to_markdown(rows: Sequence[Mapping], title: str | None = None) -> str:
    """Rows as Markdown: per pair, header lines (teacher, protocol), one table, then notes.

    Args:
        rows: Rows from :func:`summarize`.
        title: Optional ``##`` heading above the tables.
    """
    out = [f"## {_esc(title)}", ""] if title else []
    for pair, prows in _by_pair(rows).items():
        pct = f"{(prows[0]['ci_level'] or 0.95):.0%}"
        out += _header(pair, prows)
        out.append(f"| method | hp | seeds | acc (last) | best (val-selected) | Δ student [{pct} CI] | wins | "
                   f"Δ KD [{pct} CI] | wins vs KD | train s | teacher s | params | +params | published |")
        out.append("|" + "---|" * 14)
        notes: list[str] = []
        for r in prows:
            best = _pm(r["best_mean"], r["best_std"], r["best_n"]) if r["best_n"] else "—"
            if r["best_selected_on"] == "test":
                best += " (test-selected)"
                notes.append(f"- `{_name(r)}`: its best-epoch column was selected on the **test** split (no "
                             "validation split); it is optimistic and not comparable to val-selected numbers.")
            pub = _published(r)
            seeds = ",".join("–" if s is None else str(s) for s in r["seeds"]) or "—"
            cells = [_name(r), _esc(r["hp"] or "—"), _esc(seeds), _acc(r), best, _delta(r, "d_baseline"),
                     _wins(r, "d_baseline"), _delta(r, "d_kd"), _wins(r, "d_kd"), _secs(r["train_s_mean"]),
                     _secs(r["teacher_s_mean"]), _count(r["params"]), _count(r["extra_params"]), pub]
            out.append("| " + " | ".join(cells) + " |")
            reasons: dict[str, list[str]] = {}
            for na in r["na"]:
                reasons.setdefault(na["reason"], []).append("–" if na["seed"] is None else str(na["seed"]))
            for reason, seeds_na in reasons.items():
                notes.append(f"- `{_name(r)}` n/a (seed{'s' * (len(seeds_na) > 1)} {', '.join(seeds_na)}): "
                             f"{_esc(reason)}")
        hashes = {h for r in prows if r["kind"] != "teacher" and r["teacher_hash"]
                  for h in r["teacher_hash"].split(",")}
        if len(hashes) > 1:
            notes.append(f"- rows of this pair used different teachers (hashes {', '.join(sorted(hashes))}).")
        out += ([""] + notes if notes else []) + [""]
    return "\n".join(out)


def to_markdown_compact(rows: Sequence[Mapping]) -> str:
    """One line per (pair, method), member rows left out, costs included: for a README (with a
    ``published`` column when the suite gives papers' numbers)."""
    pct = f"{(rows[0]['ci_level'] or 0.95):.0%}" if rows else "95%"
    pub = any(r.get("published_value") is not None for r in rows)
    out = [f"| pair | method | acc (last), mean ± std | seeds | Δ student [{pct} CI] | wins | Δ KD [{pct} CI] | "
           "train s | teacher s | +params |" + (" published |" if pub else ""),
           "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if pub else "")]
    for r in rows:
        if r["kind"] == "member":
            continue
        paper = f" {_published(r)} |" if pub else ""
        if r["kind"] == "teacher":
            out.append(f"| {_esc(r['pair'])} | {_name(r)} | {_acc(r)} | — | — | — | — | {_secs(r['train_s_mean'])} "
                       f"| — | — |{paper}")
            continue
        out.append(f"| {_esc(r['pair'])} | {_name(r)} | {_acc(r)} | {r['n']} | {_delta(r, 'd_baseline')} | "
                   f"{_wins(r, 'd_baseline')} | {_delta(r, 'd_kd')} | {_secs(r['train_s_mean'])} | "
                   f"{_secs(r['teacher_s_mean'])} | {_count(r['extra_params'])} |{paper}")
    out += ["", ("Last-epoch test accuracy, mean ± sample std over seeds; Δ = paired difference to the same-budget "
                 f"student trained alone (`ce`) and to KD, with a {pct} t-interval over seeds; wins = seeds ahead "
                 "of the student alone; train s = mean training seconds per seed; teacher s = teacher-output cache "
                 "or in-cell teacher training seconds; +params = parameters the method adds during training "
                 "(adapters, heads, embeddings)." + (" Published: the paper's number for that cell and how it was "
                                                     "measured." if pub else ""))]
    return "\n".join(out) + "\n"


def _published(r: Mapping) -> str:
    if r.get("published_value") is None:
        return "—"
    return f"{r['published_value']:.2f} ({_esc(r['published_protocol'])})"
