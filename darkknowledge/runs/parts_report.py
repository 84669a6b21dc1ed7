"""Report sections of stages with several trainable parts: synthetic samples and the parts' losses.

A data-free or generator-fed stage keeps its synthesiser's latest samples in
``<stage>/samples.pt``; a stage with a generator or discriminators logs each part's loss per epoch
(``train/<part>/<term>`` in ``metrics.jsonl``). :func:`parts_sections` turns both into Markdown for
``report.md``: a grid of the samples (2-D inputs) or their line plots (1-D), a figure of the
parts' loss curves, and a table of those losses per epoch. Figures need matplotlib (the ``plots``
extra); without it the tables are written and a line says what is missing.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from darkknowledge.engine.checkpoint import safe_load
from darkknowledge.plotting import have_matplotlib, new_figure, save_png

log = logging.getLogger(__name__)

MAX_ROWS = 12
"""Epochs shown in a losses table (evenly spaced, the first and last always)."""


def part_losses(records: Sequence[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    """Per epoch of ``stage``: ``{"epoch", "<part>/<term>": value, ...}`` (parts' terms only).

    The last record of an epoch wins (a resumed epoch is logged again).
    """
    by_epoch: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("kind") != "train" or r.get("stage") != stage:
            continue
        values = {k[len("train/") :]: v for k, v in r.items() if k.startswith("train/") and k.count("/") == 2}
        if values:
            by_epoch[int(r["epoch"])] = {"epoch": int(r["epoch"]), **values}
    return [by_epoch[e] for e in sorted(by_epoch)]


def shown_epochs(n: int, limit: int = MAX_ROWS) -> list[int]:
    """Indices of ``n`` rows to show: all when ``n <= limit``, else evenly spaced with both ends."""
    if n <= limit:
        return list(range(n))
    step = (n - 1) / (limit - 1)
    return sorted({round(i * step) for i in range(limit)})


def losses_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A Markdown table: one row per shown epoch, one column per part's loss (``<part>/loss`` first)."""
    keys = sorted({k for r in rows for k in r if k != "epoch"}, key=lambda k: (k.split("/")[1] != "loss", k))
    lines = ["| epoch | " + " | ".join(keys) + " |", "|---|" + "|".join("---" for _ in keys) + "|"]
    for i in shown_epochs(len(rows)):
        r = rows[i]
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else "-" for k in keys]
        lines.append(f"| {r['epoch']} | " + " | ".join(cells) + " |")
    return lines


def losses_figure(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Each part's loss (``<part>/loss``) against the epoch, one panel per part."""
    parts = sorted({k.split("/")[0] for r in rows for k in r if k.endswith("/loss")})
    fig = new_figure(3.6 * len(parts), 2.8, "report figures")
    epochs = [r["epoch"] for r in rows]
    for i, part in enumerate(parts):
        ax = fig.add_subplot(1, len(parts), i + 1)
        ax.plot(epochs, [r.get(f"{part}/loss", float("nan")) for r in rows], marker=".", lw=1)
        ax.set_title(f"{part} loss", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def samples_figure(x: torch.Tensor, path: Path, title: str) -> Path:
    """A grid of images ``(n, C, H, W)`` (C = 1 or 3; each scaled to its own range), or line plots of
    signals ``(n, L)`` / ``(n, C, L)`` (C lines each)."""
    x = x.detach().float().cpu()
    n = x.shape[0]
    cols = min(8, n)
    rows = math.ceil(n / cols)
    image = x.dim() == 4 and x.shape[1] in (1, 3)
    fig = new_figure(1.2 * cols if image else 1.8 * cols, 1.2 * rows if image else 1.1 * rows, "report figures")
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        if image:
            img = x[i]
            img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)  # (C, H, W) in [0, 1]
            ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray" if img.shape[0] == 1 else None)
        else:
            signal = x[i].reshape(-1, x.shape[-1])  # (C, L)
            for channel in signal:
                ax.plot(channel.numpy(), lw=0.8)
    fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash: the rest still reports
    return records


def parts_sections(run_path: Path, results: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown for ``report.md``: per stage of the first seed that has samples or several parts,
    its samples (figure) and its parts' losses per epoch (figure and table). Figures are written
    beside the stage's checkpoints and linked by relative path."""
    seeds = [s for e in results if (s := e.get("seed")) is not None]
    first = min(seeds) if seeds else None
    records = _read_metrics(run_path / "metrics.jsonl")
    plots = have_matplotlib()
    out: list[str] = []
    for entry in results:
        stage = entry["name"]
        if entry.get("seed") != first or ":" in stage:
            continue
        folder = run_path / stage
        samples = folder / "samples.pt"
        losses = part_losses(records, stage)
        if not samples.is_file() and not losses:
            continue
        out += [f"### {stage} ({entry.get('method')})", ""]
        if samples.is_file() and plots:
            payload = safe_load(samples, map_location="cpu")
            samples_figure(
                payload["x"],
                folder / "samples.png",
                f"{stage}: {payload.get('synthesizer', '')} samples (step {payload.get('step', '?')})",
            )
            out += [f"![synthetic samples of {stage}]({stage}/samples.png)", ""]
        if losses:
            if plots:
                losses_figure(losses, folder / "losses.png", f"{stage}: each part's loss per epoch")
                out += [f"![losses of {stage}]({stage}/losses.png)", ""]
            out += [
                "Each part's training loss per epoch (mean over the epoch's steps of that part):",
                "",
                *losses_table(losses),
                "",
            ]
    if out and not plots:
        out.append("(figures need matplotlib: pip install matplotlib, then rerun with --resume to draw them)")
    return (["## Synthesised samples and the parts' losses", ""] + out) if out else []
