"""The student report: teacher and students side by side in size, FLOPs, latency and accuracy.

The survey judges a student by what it keeps of the teacher's accuracy for what it saves in
size and time (Gou et al., "Knowledge Distillation: A Survey", IJCV 2021, Sec. 6 and the
compression/acceleration comparisons of Sec. 8). With the teacher's row ``t`` (the first row
whose role is ``"teacher"``) each row ``r`` gets:

- speed-up ``= t.latency_ms_b1 / r.latency_ms_b1`` (batch 1, CPU);
- compression ``= t.size_fp32_bytes / deployable(r)``, where ``deployable(r)`` is
  ``r.size_quant_bytes`` for a quantized row (``quant_bits`` set) and ``r.size_fp32_bytes``
  otherwise.

Units are decimal: K = 1e3 and M = 1e6 parameters, KB = 1e3 and MB = 1e6 bytes, KFLOPs /
MFLOPs / GFLOPs per sample (2 x multiply-accumulates, see
:mod:`darkknowledge.students.profile`). Accuracy is shown as given (the run reports give top-1
in percent).

A row is a plain dict (:func:`profile_row`), so rows read back from JSON work alike.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from darkknowledge.errors import ConfigError
from darkknowledge.plotting import have_matplotlib, new_figure, save_png
from darkknowledge.students.profile import ModelProfile

log = logging.getLogger(__name__)

ROW_KEYS = (
    "role",
    "name",
    "params",
    "size_fp32_bytes",
    "size_quant_bytes",
    "quant_bits",
    "flops",
    "latency_ms_b1",
    "latency_ms_bN",
    "batch_n",
)
"""The keys every row must hold (``acc`` and ``ptq_bits`` may be None or absent)."""
MISSING = "-"


def profile_row(role: str, name: str, profile: ModelProfile | dict[str, Any], acc: float | None) -> dict[str, Any]:
    """A table row: ``{"role", "name", "acc", **profile fields}``.

    Args:
        role: ``"teacher"``, ``"student"``, ``"baseline"``, ... (the first ``"teacher"`` is the reference).
        name: The model's name.
        profile: Its :class:`ModelProfile` (or the dict of :meth:`ModelProfile.to_dict`).
        acc: Its accuracy (None when unknown).
    """
    if not isinstance(profile, ModelProfile):
        if not isinstance(profile, dict):
            raise ConfigError(f"profile_row: profile must be a ModelProfile or its dict, got {type(profile).__name__}")
        profile = ModelProfile.from_dict(profile)
    if acc is not None and (isinstance(acc, bool) or not isinstance(acc, (int, float))):
        raise ConfigError(f"profile_row: acc must be a number or None, got {acc!r}")
    return {"role": str(role), "name": str(name), "acc": None if acc is None else float(acc), **profile.to_dict()}


def _check_rows(rows: Sequence[dict[str, Any]]) -> None:
    if not isinstance(rows, (list, tuple)):
        raise ConfigError(f"student_table: rows must be a list of dicts (see profile_row), got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"student_table: row {i} must be a dict (see profile_row), got {type(row).__name__}")
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ConfigError(
                f"student_table: row {i} ({row.get('name')!r}) lacks {', '.join(missing)}; "
                f"rows need {', '.join(ROW_KEYS)} (build them with profile_row)"
            )


def _scaled(value: float, units: Sequence[tuple[float, str]], digits: int = 3) -> str:
    """``value`` in the largest unit it reaches, to ``digits`` significant digits (``13.7K``)."""
    for i, (factor, suffix) in enumerate(units):
        if abs(value) >= factor:
            scaled = value / factor
            decimals = max(0, digits - 1 - math.floor(math.log10(abs(scaled))))
            text = f"{scaled:.{decimals}f}"
            if i > 0 and abs(float(text)) >= units[i - 1][0] / factor:  # 999.96K rounds to 1000K: say 1.00M
                return _scaled(units[i - 1][0] * (1 if value > 0 else -1), units, digits)
            return f"{text}{suffix}"
    return f"{value:g}{units[-1][1] if units[-1][0] == 1 else ''}"


def human_params(n: float) -> str:
    """Parameters: ``950``, ``13.7K``, ``1.23M``, ``2.50B``."""
    return _scaled(n, [(1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")])


def human_bytes(n: float) -> str:
    """Bytes, decimal units: ``950 B``, ``53.5 KB``, ``1.23 MB``, ``2.10 GB``."""
    return _scaled(n, [(1e9, " GB"), (1e6, " MB"), (1e3, " KB"), (1, " B")])


def human_flops(n: float) -> str:
    """FLOPs: ``400 FLOPs``, ``326 KFLOPs``, ``41.2 MFLOPs``, ``1.82 GFLOPs``."""
    return _scaled(n, [(1e9, " GFLOPs"), (1e6, " MFLOPs"), (1e3, " KFLOPs"), (1, " FLOPs")])


def human_ms(ms: float) -> str:
    """Milliseconds to 3 significant digits (at least 2 decimals below 1 ms): ``0.052``, ``1.23``, ``412``."""
    if ms <= 0:
        return f"{ms:.3f}"
    decimals = max(0, 2 - math.floor(math.log10(ms)))
    return f"{ms:.{decimals}f}"


def deployable_bytes(row: dict[str, Any]) -> int:
    """The size a row deploys at: its packed quantized size when it is quantized, else float32."""
    return row["size_quant_bytes"] if row.get("quant_bits") is not None else row["size_fp32_bytes"]


def _quant_cell(row: dict[str, Any]) -> str:
    size = row.get("size_quant_bytes")
    if size is None:
        return MISSING
    if row.get("quant_bits") is not None:
        return f"{human_bytes(size)} ({row['quant_bits']}-bit)"
    if row.get("ptq_bits") is not None:
        return f"{human_bytes(size)} ({row['ptq_bits']}-bit PTQ)"
    return human_bytes(size)


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den <= 0:
        return MISSING
    return f"{num / den:.2f}x"


def student_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of ``rows`` (see :func:`profile_row`), in their order.

    Columns: role, model, params, size fp32, size quantized (bits; "PTQ" when it is the
    post-training estimate of a float model), FLOPs (per sample), latency at batch 1 and at
    batch N (ms, CPU median), accuracy, speed-up and compression against the first teacher row
    (see the module docstring); without a teacher row the last two columns are ``-``.

    Raises:
        ConfigError: ``rows`` is not a list of dicts holding :data:`ROW_KEYS`.
    """
    _check_rows(rows)
    sizes = sorted({r["batch_n"] for r in rows})
    batch_head = f"latency b={sizes[0]} (ms)" if len(sizes) == 1 else "latency b=N (ms)"
    head = [
        "role",
        "model",
        "params",
        "size fp32",
        "size quantized",
        "FLOPs",
        "latency b=1 (ms)",
        batch_head,
        "acc",
        "speed-up",
        "compression",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    teacher = next((r for r in rows if r["role"] == "teacher"), None)
    for r in rows:
        latency_n = human_ms(r["latency_ms_bN"]) + ("" if len(sizes) == 1 else f" (b={r['batch_n']})")
        cells = [
            r["role"],
            r["name"],
            human_params(r["params"]),
            human_bytes(r["size_fp32_bytes"]),
            _quant_cell(r),
            human_flops(r["flops"]),
            human_ms(r["latency_ms_b1"]),
            latency_n,
            MISSING if r.get("acc") is None else f"{r['acc']:.2f}",
            _ratio(teacher["latency_ms_b1"], r["latency_ms_b1"]) if teacher else MISSING,
            _ratio(teacher["size_fp32_bytes"], deployable_bytes(r)) if teacher else MISSING,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_latency(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Accuracy against batch-1 CPU latency, one labelled point per row (teacher as a square).

    The x axis is logarithmic when the latencies span more than 20x.

    Args:
        rows: Rows from :func:`profile_row`.
        path: The PNG to write (its folder is created).

    Returns:
        ``path``, or None when matplotlib is not installed (the table needs nothing more).

    Raises:
        ConfigError: The rows are malformed, or none has both an accuracy and a positive latency.
    """
    _check_rows(rows)
    points = [r for r in rows if r.get("acc") is not None and r["latency_ms_b1"] > 0]
    if not points:
        raise ConfigError("plot_accuracy_latency: no row has both an accuracy and a positive latency; nothing to plot")
    if not have_matplotlib():
        log.info("matplotlib is not installed: no accuracy-latency plot (pip install matplotlib)")
        return None
    fig = new_figure(5.0, 3.8, "the accuracy-latency plot")
    ax = fig.add_subplot(1, 1, 1)
    for r in points:
        teacher = r["role"] == "teacher"
        ax.plot(
            [r["latency_ms_b1"]],
            [r["acc"]],
            marker="s" if teacher else "o",
            markersize=7 if teacher else 6,
            color="tab:red" if teacher else "tab:blue",
            linestyle="none",
        )
        ax.annotate(
            f"{r['name']} ({r['role']})",
            (r["latency_ms_b1"], r["acc"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    latencies = [r["latency_ms_b1"] for r in points]
    if max(latencies) / min(latencies) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("CPU latency, batch 1 (ms)", fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("accuracy vs latency", fontsize=9)
    return save_png(fig, path)
