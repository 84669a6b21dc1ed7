"""Comparison tables and verdicts, following the project's reporting protocol.

Headline: last-epoch test accuracy, mean ± sample std over seeds (seeds listed). Best-epoch
accuracy is shown beside it, labelled, since it selects on the test set unless a validation
split exists. A cost column gives train time and parameters (of the model and of adapters).
"""

from __future__ import annotations

import statistics
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def group_rows(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (role, model, method) group of entries, with mean ± std over seeds.

    The method is the entry's ``method`` label (a scheme's name) or else its losses. Rows come
    in the order teacher, baseline, student, then the other roles (peers, heads, stages) as
    first recorded.
    """
    groups: OrderedDict[tuple, list[dict[str, Any]]] = OrderedDict()
    order = {"teacher": 0, "baseline": 1, "student": 2}
    for e in sorted(entries, key=lambda e: order.get(e["role"], 9)):
        method = e.get("method") or "+".join(e.get("losses", ())) or "-"
        key = e["name"] if e["role"] == "teacher" else method  # several teachers: one row each
        groups.setdefault((e["role"], e["model"], key), []).append(e)
    rows = []
    for (role, model, _), es in groups.items():
        method = es[0].get("method") or "+".join(es[0].get("losses", ())) or "-"
        last_m, last_s = mean_std([e["last_acc"] for e in es if e.get("last_acc") is not None])
        best_m, best_s = mean_std([e["best_acc"] for e in es if e.get("best_acc") is not None])
        rows.append(
            {
                "role": role,
                "model": model,
                "method": method,
                "params": es[0]["params"],
                "extra_params": es[0].get("extra_params", 0),
                "seeds": [e.get("seed") for e in es],
                "last_mean": last_m,
                "last_std": last_s,
                "best_mean": best_m,
                "best_std": best_s,
                "last_values": [e.get("last_acc") for e in es],
                "time_mean": statistics.fmean(float(e.get("train_seconds", 0.0)) for e in es),
                "steps": es[0].get("steps"),
                "reused": any("reused_from" in e or "source" in e for e in es),
                "selected_on": es[0].get("best_selected_on", "test"),
            }
        )
    return rows


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    """One or two sentences comparing the distilled student with the baseline student."""
    base = next((r for r in rows if r["role"] == "baseline"), None)
    kd = next((r for r in rows if r["role"] == "student"), None)
    if base is None or kd is None:
        return "No baseline/student pair to compare."
    delta = kd["last_mean"] - base["last_mean"]
    spread = max(base["last_std"], kd["last_std"])
    paired = [k - b for k, b in zip(kd["last_values"], base["last_values"]) if k is not None and b is not None]
    wins = sum(1 for d in paired if d > 0)
    if delta > spread:
        head = f"Distillation helps: the {kd['method']} student beats the baseline by {delta:+.2f} points"
        tail = f", more than the seed spread (std {spread:.2f})"
    elif delta > 0:
        head = f"Inconclusive: the {kd['method']} student is ahead by {delta:+.2f} points"
        tail = f", within the seed spread (std {spread:.2f})"
    else:
        head = f"Distillation did not help: the {kd['method']} student trails the baseline by {delta:+.2f} points"
        tail = f" (seed std {spread:.2f})"
    return f"{head}{tail}; it wins on {wins}/{len(paired)} seeds from the same initialisation."


def _fmt(m: float, s: float, n: int) -> str:
    if m != m:  # NaN: not measured (e.g. no best epoch for a peer or head row)
        return "-"
    return f"{m:.2f}" if n <= 1 else f"{m:.2f} ± {s:.2f}"


def table_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A Markdown table of the rows (also readable as plain text)."""
    head = [
        "model",
        "role",
        "method",
        "params",
        "acc (last) mean ± std",
        "acc (best epoch)",
        "train s",
        "steps",
        "seeds",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        n = len(r["seeds"])
        params = f"{r['params'] / 1e3:.1f}K" + (f" +{r['extra_params'] / 1e3:.1f}K" if r["extra_params"] else "")
        time_s = "cached" if r["reused"] else f"{r['time_mean']:.1f}"
        seeds = ",".join(str(s) for s in r["seeds"] if s is not None) or "-"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    r["role"],
                    r["method"],
                    params,
                    _fmt(r["last_mean"], r["last_std"], n),
                    _fmt(r["best_mean"], r["best_std"], n),
                    time_s,
                    str(r["steps"]) if r.get("steps") else "-",
                    seeds,
                ]
            )
            + " |"
        )
    return lines


def render_report(
    title: str, rows: Sequence[dict[str, Any]], notes: Sequence[str] = (), sections: Sequence[str] = ()
) -> str:
    """The ``report.md`` text: table, verdict, protocol notes, then further sections (Markdown lines)."""
    selected = {r["selected_on"] for r in rows}
    parts = [f"# {title}", "", *table_lines(rows), "", f"**Verdict.** {verdict(rows)}", ""]
    parts.append(
        "Protocol: accuracy is top-1 on the test split at the last epoch, mean ± sample std over the "
        "seeds listed; 'best epoch' selects on the "
        + ("validation split" if selected == {"val"} else "test split (optimistic, shown for comparison only)")
        + ". Baseline and distilled student of a seed "
        "start from the same initialisation and train with the same epochs and optimizer ('steps' counts optimizer "
        "steps: a student that also reads an unlabeled transfer set takes more of them per epoch)."
    )
    parts += [f"- {n}" for n in notes]
    if sections:
        parts += ["", *sections]
    return "\n".join(parts) + "\n"
