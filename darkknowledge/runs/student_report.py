"""The report's student section: every trained model of the run in size, FLOPs, latency and accuracy.

Written from the results entries alone (each stage records its model's ``profile``, see
:mod:`darkknowledge.runs.profiling`): one row per (role, model, method) as in the accuracy
table, the accuracy the mean last-epoch accuracy over its seeds, the teacher's row first so
that speed-up and compression are against it; and a figure of accuracy against batch-1 latency
(``students.png``, with matplotlib).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from darkknowledge.runs.report import group_rows
from darkknowledge.students.report import plot_accuracy_latency, profile_row, student_table

log = logging.getLogger(__name__)


def student_rows(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of :func:`~darkknowledge.students.report.student_table` for the profiled entries."""
    profiled = [e for e in entries if isinstance(e.get("profile"), dict)]
    out = []
    for row in group_rows(profiled):
        first = next(
            e
            for e in profiled
            if e["role"] == row["role"]
            and e["model"] == row["model"]
            and (e.get("method") or "+".join(e.get("losses", ())) or "-") == row["method"]
        )
        label = row["model"] if row["role"] in ("teacher", "baseline") else f"{row['model']} ({row['method']})"
        acc = row["last_mean"] if row["last_mean"] == row["last_mean"] else None  # NaN: no accuracy recorded
        out.append(profile_row(row["role"], label, first["profile"], acc))
    return out


def student_section(run_path: Path | None, entries: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines of the student report (empty when nothing was profiled)."""
    rows = student_rows(entries)
    if not rows:
        return []
    first = rows[0]
    lines = [
        "## Student report",
        "",
        student_table(rows).rstrip("\n"),
        "",
        f"Sizes: the safetensors file of the weights in float32, and quantized (a quantized model's own bits; "
        f"a float model's weights at {first.get('ptq_bits') or 8} bits per channel, post-training: what it would "
        f"take, not what it was trained at). FLOPs per sample (2 x multiply-accumulates, torch's flop counter). "
        f"Latency: median of {first.get('repeats', '?')} timed forward calls on the CPU "
        f"({first.get('threads', '?')} threads) after warm-up, at batch 1 and at the training batch "
        f"({first['batch_n']}); accuracy: mean last-epoch top-1 over the seeds."
        + (
            " A quantized model is timed as trained, with its fake-quantization in float arithmetic: integer "
            "kernels of a deployment runtime are what turn its bits into speed, so its latency here is not "
            "its deployed latency."
            if any(r.get("quant_bits") for r in rows)
            else ""
        ),
    ]
    if run_path is not None and len(rows) > 1:
        try:
            figure = plot_accuracy_latency(rows, run_path / "students.png")
        except Exception as exc:  # noqa: BLE001 - a figure is not worth failing a finished run's report for
            log.warning("students.png not drawn: %s", exc)
            figure = None
        if figure is not None:
            lines += ["", "![accuracy against latency](students.png)"]
    return lines
