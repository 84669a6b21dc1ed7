"""Comparison tables and verdicts, following the project's reporting protocol.

Headline: last-epoch test accuracy, mean ± sample std over seeds (seeds listed). Best-epoch
accuracy is shown beside it, labelled, since it selects on the test set unless a validation
split exists. A cost column gives train time and parameters (of the model and of adapters).

Fidelity (Stanton et al., NeurIPS 2021): where the run has one pre-trained teacher, the baseline's
and the student's top-1 agreement with it (``agree %``) and KL(teacher ‖ student) at T=1
(``KL(T‖S)``) on the test split, mean ± std over seeds; ``-`` where not measured. A table
none of whose rows has them (an older ``results.json``) keeps its earlier columns.

Under the table, each teacher's calibration (ECE on the test split) and fit of its training split
where measured, and a warning for each one that memorised it; in the verdict, when
the student does not beat the baseline, the likely causes the run measured
(:mod:`~darkknowledge.runs.diagnosis`).
"""

from __future__ import annotations

import statistics
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from darkknowledge.runs.diagnosis import causes, teacher_lines


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
        agree = [e["agreement"] for e in es if e.get("agreement") is not None]
        kl = [e["kl_to_teacher"] for e in es if e.get("kl_to_teacher") is not None]
        measured = {k: _mean_of(es, k) for k in _MEASURED}
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
                "agree_mean": mean_std(agree)[0],
                "agree_std": mean_std(agree)[1],
                "agree_n": len(agree),
                "kl_mean": mean_std(kl)[0],
                "kl_std": mean_std(kl)[1],
                "kl_n": len(kl),
                "last_values": [e.get("last_acc") for e in es],
                "time_mean": statistics.fmean(float(e.get("train_seconds", 0.0)) for e in es),
                "steps": es[0].get("steps"),
                "reused": any("reused_from" in e or "source" in e for e in es),
                "selected_on": es[0].get("best_selected_on", "test"),
                **measured,
            }
        )
    return rows


_MEASURED = ("train_acc", "train_confidence", "ece", "loss_drop")
"""Entry fields a row carries as their mean over its entries (NaN: none recorded): a teacher's training accuracy,
mean top probability on its training split and calibration, a stage's loss trend (see runs/diagnosis.py)."""


def _mean_of(entries: Sequence[dict[str, Any]], key: str) -> float:
    values = [float(e[key]) for e in entries if isinstance(e.get(key), int | float)]
    return statistics.fmean(values) if values else float("nan")


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    """One or two sentences comparing the distilled student with the baseline student.

    When the student does not beat the baseline by more than the seed spread, the likely causes the
    run measured follow, with their numbers (:func:`~darkknowledge.runs.diagnosis.causes`).
    """
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
    text = f"{head}{tail}; it wins on {wins}/{len(paired)} seeds from the same initialisation."
    found = causes(rows) if delta <= spread else []
    if found:
        text += " Likely cause" + ("s" if len(found) > 1 else "") + " (measured): " + "; ".join(found) + "."
    return text


FIDELITY_NOTE = (
    " Fidelity (Stanton et al., NeurIPS 2021): 'agree %' is the share of test samples on which the model's top-1 "
    "class is the teacher's, 'KL(T‖S)' the mean KL divergence from the teacher's softmax to the model's at "
    "temperature 1 (nats); the baseline's are the reference for what distillation added."
)


def _fmt(m: float, s: float, n: int, digits: int = 2) -> str:
    if m != m:  # NaN: not measured (e.g. no best epoch for a peer or head row)
        return "-"
    return f"{m:.{digits}f}" if n <= 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def table_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A Markdown table of the rows (also readable as plain text); the fidelity columns only when a row has them."""
    fidelity = any(r.get("agree_n") or r.get("kl_n") for r in rows)
    head = [
        "model",
        "role",
        "method",
        "params",
        "acc (last) mean ± std",
        "acc (best epoch)",
        *(["agree %", "KL(T‖S)"] if fidelity else []),
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
                    *(
                        [
                            _fmt(r["agree_mean"], r["agree_std"], r["agree_n"]),
                            _fmt(r["kl_mean"], r["kl_std"], r["kl_n"], digits=3),
                        ]
                        if fidelity
                        else []
                    ),
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
    about = teacher_lines(rows)  # calibration and training fit; a memorised teacher's warning
    parts = [f"# {title}", "", *table_lines(rows), *([""] + [f"- {line}" for line in about] if about else [])]
    parts += ["", f"**Verdict.** {verdict(rows)}", ""]
    parts.append(
        "Protocol: accuracy is top-1 on the test split at the last epoch, mean ± sample std over the "
        "seeds listed; 'best epoch' selects on the "
        + ("validation split" if selected == {"val"} else "test split (optimistic, shown for comparison only)")
        + ". Baseline and distilled student of a seed "
        "start from the same initialisation and train with the same epochs and optimizer ('steps' counts optimizer "
        "steps: a student that also reads an unlabeled transfer set takes more of them per epoch)."
        + (FIDELITY_NOTE if any(r.get("agree_n") for r in rows) else "")
    )
    parts += [f"- {n}" for n in notes]
    if sections:
        parts += ["", *sections]
    return "\n".join(parts) + "\n"
