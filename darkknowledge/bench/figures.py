"""Benchmark figures from the rows of :func:`darkknowledge.bench.tables.summarize`, written as PNG.

matplotlib is optional (:mod:`darkknowledge.plotting`: a missing one is one clear error); figures
are drawn on the Agg canvas and written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from darkknowledge.errors import ConfigError
from darkknowledge.plotting import new_figure, save_png

BASELINE_COLOR = "#7f7f7f"  # the student trained alone
KD_COLOR = "#ff7f0e"  # vanilla KD
METHOD_COLOR = "#1f77b4"
_PAIR_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def _color(row: Mapping) -> str:
    if row["kind"] == "baseline":
        return BASELINE_COLOR
    return KD_COLOR if row["method"] == "kd" else METHOD_COLOR


def _student_rows(rows: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    """Baseline and method rows per pair, in order (teachers and member rows left out)."""
    out: dict[str, list[Mapping]] = {}
    for r in rows:
        if r["kind"] in ("baseline", "method"):
            out.setdefault(str(r["pair"]), []).append(r)
    return out


def bar_chart(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Per pair, one bar per method: last-epoch accuracy mean with sample-std error bars.

    The baseline (student alone) is grey, vanilla KD orange, the teacher a dashed line; n/a
    methods keep their place with an "n/a" label. The y axis is zoomed to the data.

    Args:
        rows: Rows from :func:`~darkknowledge.bench.tables.summarize`.
        path: The PNG to write (its folder is created).

    Returns:
        ``path``.

    Raises:
        ConfigError: No pair has a finished method cell, or matplotlib is missing.
    """
    pairs = _student_rows(rows)
    if not any(r["last_mean"] is not None for rs in pairs.values() for r in rs):
        raise ConfigError("bar_chart: no baseline or method row has a finished cell; nothing to plot")
    teachers = {r["pair"]: r["last_mean"] for r in rows if r["kind"] == "teacher" and r["last_mean"] is not None}
    widest = max(len(rs) for rs in pairs.values())
    ncols = min(3, len(pairs)) if widest <= 8 else 1  # many methods: one pair per row, readable labels
    nrows = math.ceil(len(pairs) / ncols)
    fig = new_figure(ncols * max(3.5, min(0.3 * widest + 1.5, 14.0)), nrows * 3.6)
    for i, (pair, prows) in enumerate(pairs.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        means = [r["last_mean"] for r in prows]
        done = [(m, r["last_std"] or 0.0) for m, r in zip(means, prows) if m is not None]
        low = min([m - s for m, s in done] + [teachers.get(pair, math.inf)])
        high = max([m + s for m, s in done] + [teachers.get(pair, -math.inf)])
        pad = max(1.0, 0.15 * (high - low))
        bottom = max(0.0, low - pad)
        xs = list(range(len(prows)))
        ax.bar(
            xs,
            [(m - bottom) if m is not None else 0.0 for m in means],
            bottom=bottom,
            yerr=[(r["last_std"] or 0.0) if r["last_mean"] is not None else 0.0 for r in prows],
            color=[_color(r) for r in prows],
            capsize=3,
            edgecolor="black",
            linewidth=0.5,
        )
        for x, m in zip(xs, means):
            if m is None:
                ax.text(x, bottom, "n/a", ha="center", va="bottom", fontsize=8)
        if pair in teachers:
            ax.axhline(teachers[pair], color="black", linestyle="--", linewidth=1)
            ax.text(len(prows) - 0.5, teachers[pair], " teacher", va="bottom", ha="right", fontsize=8)
        ax.set_ylim(bottom, high + pad)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(r["method"]) for r in prows], rotation=45, ha="right", fontsize=8)
        ax.set_title(str(pair), fontsize=10)
        ax.set_ylabel("last-epoch test acc (%)", fontsize=8)
    fig.suptitle("mean ± sample std over seeds; grey: student alone, orange: vanilla KD, dashed: teacher", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


def cost_plot(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Accuracy (last-epoch mean, std error bars) against mean train seconds per seed.

    One panel per pair, one labelled marker per method: a square for the baseline, a diamond
    for vanilla KD, circles for the other methods. The x axes are logarithmic when the times
    span more than 20×.

    Args:
        rows: Rows from :func:`~darkknowledge.bench.tables.summarize`.
        path: The PNG to write (its folder is created).

    Returns:
        ``path``.

    Raises:
        ConfigError: No row has both an accuracy and a train time, or matplotlib is missing.
    """
    pairs = _student_rows(rows)
    points = [
        (p, r)
        for p, rs in pairs.items()
        for r in rs
        if r["last_mean"] is not None and r["train_s_mean"] is not None and r["train_s_mean"] > 0
    ]
    if not points:
        raise ConfigError(
            "cost_plot: no baseline or method row has both a mean accuracy and a train time; nothing to plot"
        )
    names = list(dict.fromkeys(p for p, _ in points))
    fig = new_figure(8.0, 4.2 * len(names))  # one panel per pair: methods labelled by name alone
    times = [r["train_s_mean"] for _, r in points]
    for k, name in enumerate(names):
        ax = fig.add_subplot(len(names), 1, k + 1)
        color = _PAIR_COLORS[k % len(_PAIR_COLORS)]
        for pair, r in points:
            if pair != name:
                continue
            marker = "s" if r["kind"] == "baseline" else ("D" if r["method"] == "kd" else "o")
            ax.errorbar(
                [r["train_s_mean"]],
                [r["last_mean"]],
                yerr=[r["last_std"] or 0.0],
                fmt=marker,
                color=_color(r) if r["kind"] == "baseline" or r["method"] == "kd" else color,
                capsize=3,
                markersize=6,
            )
            ax.annotate(
                str(r["method"]),
                (r["train_s_mean"], r["last_mean"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        if max(times) / min(times) > 20:
            ax.set_xscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("mean train seconds per seed (teacher training / cache time not included)", fontsize=8)
        ax.set_ylabel("last-epoch test acc (%)", fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.suptitle(
        "accuracy (mean ± sample std) against training cost; square: student alone, diamond: vanilla KD", fontsize=9
    )
    fig.tight_layout()
    return save_png(fig, path)
