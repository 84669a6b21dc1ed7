"""The pictures of a ``dk run`` folder, drawn next to ``report.md`` and embedded in it.

* ``curves.png``: per epoch, the test accuracy of every trained model (one colour per row of the
  report's table, one line per seed; each teacher's final accuracy as a dashed reference line)
  and each loss term of the training objective (mean over seeds).
* ``comparison.png``: the report's rows, last-epoch test accuracy mean ± std over seeds, with
  every seed's value as a dot.
* ``cost.png`` (two or more models that are not teachers): accuracy against training time and
  against parameters.

matplotlib is optional (the ``plots`` extra); without it the report says so in one line and the
tables stay as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from darkknowledge.plotting import have_matplotlib, new_figure, save_png
from darkknowledge.runs.outcome import epoch_rows

log = logging.getLogger(__name__)

NOT_TERMS = frozenset({"epoch", "lr", "loss", "test_acc", "val_acc"})
"""Keys of an epoch row that are not a loss term of the objective (``loss`` is their weighted sum)."""


def _label(entry: dict[str, Any]) -> str:
    """The report row an entry belongs to: ``role: model (method)``; a teacher by its name."""
    if entry["role"] == "teacher":
        return f"teacher: {entry.get('model', entry['name'])}"
    method = entry.get("method") or "+".join(entry.get("losses", ())) or "-"
    return f"{entry['role']}: {entry.get('model', '?')} ({method})"


def _curves(by_stage: dict[str, list[dict[str, Any]]], entries: Sequence[dict[str, Any]], path: Path) -> Path:
    fig = new_figure(11, 4.2, "run plots")
    acc_ax, loss_ax = fig.subplots(1, 2)
    colours: dict[str, Any] = {}
    cycle = [f"C{i}" for i in range(10)]
    losses: dict[tuple[str, str], dict[int, list[float]]] = {}
    for e in entries:
        label = _label(e)
        colour = colours.setdefault(label, cycle[len(colours) % len(cycle)])
        rows = epoch_rows(by_stage.get(e["name"], []))
        evals = [(r["epoch"], r["test_acc"]) for r in rows if "test_acc" in r]
        if e["role"] == "teacher" and e.get("last_acc") is not None:
            acc_ax.axhline(
                e["last_acc"],
                color=colour,
                linestyle="--",
                linewidth=1,
                label=label if label not in acc_ax.get_legend_handles_labels()[1] else None,
            )
        if evals:
            xs, ys = zip(*evals, strict=True)
            shown = label not in acc_ax.get_legend_handles_labels()[1]
            acc_ax.plot(
                xs,
                ys,
                color=colour,
                linewidth=1.2,
                marker="." if len(xs) < 30 else None,
                label=label if shown else None,
                alpha=0.85,
            )
        for r in rows:
            for term, v in r.items():
                if term not in NOT_TERMS and isinstance(v, (int, float)):
                    losses.setdefault((label, term), {}).setdefault(r["epoch"], []).append(v)
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy per epoch (one line per seed)")
    acc_ax.legend(fontsize=7, loc="best")
    for (label, term), per_epoch in losses.items():
        epochs = sorted(per_epoch)
        loss_ax.plot(
            epochs,
            [sum(per_epoch[x]) / len(per_epoch[x]) for x in epochs],
            color=colours.get(label, "k"),
            linewidth=1.2,
            label=f"{term} ({label})",
        )
    loss_ax.set(xlabel="epoch", ylabel="training loss term", title="loss terms per epoch (mean over seeds)")
    if losses:
        if all(v > 0 for per_epoch in losses.values() for vs in per_epoch.values() for v in vs):
            loss_ax.set_yscale("log")  # terms of very different sizes stay readable
        loss_ax.legend(fontsize=6, loc="best")
    from matplotlib.ticker import MaxNLocator

    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_png(fig, path)


def _comparison(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    fig = new_figure(7.5, 0.45 * len(rows) + 1.4, "run plots")
    ax = fig.subplots()
    names = [f"{r['role']}: {r['model']} ({r['method']})" for r in rows][::-1]
    means = [r["last_mean"] for r in rows][::-1]
    stds = [r["last_std"] if r["last_std"] == r["last_std"] else 0.0 for r in rows][::-1]
    ys = list(range(len(rows)))
    ax.barh(ys, means, xerr=stds, color="C0", alpha=0.55, capsize=3)
    for y, r in zip(ys, rows[::-1], strict=True):
        values = [v for v in r.get("last_values", []) if v is not None]
        ax.plot(values, [y] * len(values), "k.", markersize=4)
    ax.set_yticks(ys, names, fontsize=8)
    lo = min((v for r in rows for v in r.get("last_values", []) if v is not None), default=0.0)
    ax.set_xlim(max(0.0, lo - 10.0), 100.0)
    ax.set(xlabel="test accuracy (%), last epoch: mean ± std over seeds, dots: seeds", title="comparison")
    return save_png(fig, path)


def _cost(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    fig = new_figure(10, 4, "run plots")
    time_ax, params_ax = fig.subplots(1, 2)
    for i, r in enumerate(rows):
        name = f"{r['role']}: {r['model']} ({r['method']})"
        for ax, x in ((time_ax, r["time_mean"]), (params_ax, r["params"] + r.get("extra_params", 0))):
            ax.errorbar(
                [x],
                [r["last_mean"]],
                yerr=[r["last_std"] if r["last_std"] == r["last_std"] else 0.0],
                fmt="o",
                color=f"C{i % 10}",
                capsize=3,
                label=name,
            )
    time_ax.set(xlabel="training time per seed (s)", ylabel="test accuracy (%)", title="accuracy against time")
    params_ax.set(xlabel="parameters (trained, adapters included)", title="accuracy against size")
    params_ax.set_xscale("log")
    time_ax.legend(fontsize=7)
    return save_png(fig, path)


def run_figures(
    run_path: Path | None,
    entries: Sequence[dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    records: Sequence[dict[str, Any]],
) -> list[str]:
    """Draw the run's figures into ``run_path`` and return the report's Markdown lines for them.

    Args:
        run_path: The run folder (None: nothing is drawn).
        entries: The run's results entries.
        rows: The report's table rows (``group_rows``).
        records: The run's metric records (``metrics.jsonl``).

    Returns:
        ``## Figures`` lines embedding each image by relative path; one line saying why when
        matplotlib is missing; nothing without a run folder or results.
    """
    if run_path is None or not entries:
        return []
    if not have_matplotlib():
        return ["## Figures", "", "No figures: matplotlib is not installed (`pip install matplotlib`)."]
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_stage.setdefault(str(r.get("stage")), []).append(r)
    drawn = []
    jobs = [
        ("curves.png", "learning curves", lambda p: _curves(by_stage, entries, p)),
        ("comparison.png", "comparison over seeds", lambda p: _comparison(rows, p)),
    ]
    trained = [r for r in rows if r["role"] != "teacher"]
    if len(trained) >= 2:
        jobs.append(("cost.png", "accuracy against cost", lambda p: _cost(trained, p)))
    for name, alt, draw in jobs:
        try:
            draw(run_path / name)
        except Exception as exc:  # noqa: BLE001 - a figure is not worth failing a finished run's report for
            log.warning("%s not drawn: %s", name, exc)
            continue
        drawn.append(f"![{alt}]({name})")
    return ["## Figures", "", *[line for d in drawn for line in (d, "")]][:-1] if drawn else []
