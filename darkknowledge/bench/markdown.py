"""Benchmark tables as Markdown: a section per pair (every column), and the compact README block.

Rows are those of :func:`darkknowledge.bench.tables.summarize` (plain data, JSON round-trip):
this module only formats them; every number was computed there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


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
        (r for r in rows if r["teacher_model"]), None
    )
    student = next((r["student"] for r in rows if r["kind"] != "teacher" and r["student"]), None)
    suite = next((r["suite"] for r in rows if r["suite"]), None)
    lines = [f"### {_esc(pair)}" + (f" (suite `{suite}`)" if suite else ""), ""]
    if teacher is None:
        lines.append("Teacher: none recorded.")
    else:
        acc = teacher["last_mean"] if teacher["kind"] == "teacher" else teacher["teacher_acc"]
        acc_text = "accuracy not recorded" if acc is None else f"{acc:.2f}% last-epoch test accuracy"
        lines.append(
            f"Teacher: **{_esc(teacher['teacher_model'])}**, {acc_text}, hash "
            f"`{teacher['teacher_hash'] or 'unknown'}`." + (f" Student: **{_esc(student)}**." if student else "")
        )
    level = rows[0]["ci_level"] or 0.95
    protocol = (
        "Protocol: headline = last-epoch test accuracy, mean ± sample std over the listed seeds; "
        "best = test accuracy at the epoch best on the validation split; Δ = paired difference "
        f"(row − reference) with {level:.0%} t-CI over seeds; wins = seeds where the row is ahead, out "
        "of the paired seeds; costs are means per seed."
    )
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
        out.append(
            f"| method | hp | seeds | acc (last) | best (val-selected) | Δ student [{pct} CI] | wins | "
            f"Δ KD [{pct} CI] | wins vs KD | train s | teacher s | params | +params | published |"
        )
        out.append("|" + "---|" * 14)
        notes: list[str] = []
        for r in prows:
            best = _pm(r["best_mean"], r["best_std"], r["best_n"]) if r["best_n"] else "—"
            if r["best_selected_on"] == "test":
                best += " (test-selected)"
                notes.append(
                    f"- `{_name(r)}`: its best-epoch column was selected on the **test** split (no "
                    "validation split); it is optimistic and not comparable to val-selected numbers."
                )
            pub = _published(r)
            seeds = ",".join("–" if s is None else str(s) for s in r["seeds"]) or "—"
            cells = [
                _name(r),
                _esc(r["hp"] or "—"),
                _esc(seeds),
                _acc(r),
                best,
                _delta(r, "d_baseline"),
                _wins(r, "d_baseline"),
                _delta(r, "d_kd"),
                _wins(r, "d_kd"),
                _secs(r["train_s_mean"]),
                _secs(r["teacher_s_mean"]),
                _count(r["params"]),
                _count(r["extra_params"]),
                pub,
            ]
            out.append("| " + " | ".join(cells) + " |")
            reasons: dict[str, list[str]] = {}
            for na in r["na"]:
                reasons.setdefault(na["reason"], []).append("–" if na["seed"] is None else str(na["seed"]))
            for reason, seeds_na in reasons.items():
                notes.append(
                    f"- `{_name(r)}` n/a (seed{'s' * (len(seeds_na) > 1)} {', '.join(seeds_na)}): {_esc(reason)}"
                )
        hashes = {
            h for r in prows if r["kind"] != "teacher" and r["teacher_hash"] for h in r["teacher_hash"].split(",")
        }
        if len(hashes) > 1:
            notes.append(f"- rows of this pair used different teachers (hashes {', '.join(sorted(hashes))}).")
        out += ([""] + notes if notes else []) + [""]
    return "\n".join(out)


def to_markdown_compact(rows: Sequence[Mapping]) -> str:
    """One line per (pair, method), member rows left out, costs included: for a README (with a
    ``published`` column when the suite gives papers' numbers)."""
    pct = f"{(rows[0]['ci_level'] or 0.95):.0%}" if rows else "95%"
    pub = any(r.get("published_value") is not None for r in rows)
    out = [
        f"| pair | method | acc (last), mean ± std | seeds | Δ student [{pct} CI] | wins | Δ KD [{pct} CI] | "
        "train s | teacher s | +params |" + (" published |" if pub else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if pub else ""),
    ]
    for r in rows:
        if r["kind"] == "member":
            continue
        paper = f" {_published(r)} |" if pub else ""
        if r["kind"] == "teacher":
            out.append(
                f"| {_esc(r['pair'])} | {_name(r)} | {_acc(r)} | — | — | — | — | {_secs(r['train_s_mean'])} "
                f"| — | — |{paper}"
            )
            continue
        out.append(
            f"| {_esc(r['pair'])} | {_name(r)} | {_acc(r)} | {r['n']} | {_delta(r, 'd_baseline')} | "
            f"{_wins(r, 'd_baseline')} | {_delta(r, 'd_kd')} | {_secs(r['train_s_mean'])} | "
            f"{_secs(r['teacher_s_mean'])} | {_count(r['extra_params'])} |{paper}"
        )
    out += [
        "",
        (
            "Last-epoch test accuracy, mean ± sample std over seeds; Δ = paired difference to the same-budget "
            f"student trained alone (`ce`) and to KD, with a {pct} t-interval over seeds; wins = seeds ahead "
            "of the student alone; train s = mean training seconds per seed; teacher s = teacher-output cache "
            "or in-cell teacher training seconds; +params = parameters the method adds during training "
            "(adapters, heads, embeddings)."
            + (" Published: the paper's number for that cell and how it was measured." if pub else "")
        ),
    ]
    return "\n".join(out) + "\n"


def _published(r: Mapping) -> str:
    if r.get("published_value") is None:
        return "—"
    return f"{r['published_value']:.2f} ({_esc(r['published_protocol'])})"
