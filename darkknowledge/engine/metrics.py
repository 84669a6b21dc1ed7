"""Evaluation (top-1, top-5, loss, reduced across ranks) and the ``metrics.jsonl`` log."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.data.batch import UNLABELED, Batch, model_input
from darkknowledge.engine.device import autocast
from darkknowledge.engine.distributed import DistContext
from darkknowledge.engine.fsdp import is_sharded
from darkknowledge.losses.base import run_model


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    dist: DistContext,
    amp: torch.dtype | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` over ``batches``, summed over ranks.

    Returns:
        ``{"top1": %, "loss": mean CE, "n": samples}`` plus ``"top5"`` when there are
        more than 5 classes.
    """
    # an FSDP2 unit's gathered-weight buffers are reused by later forwards: not inference tensors then
    with torch.inference_mode(not is_sharded(model)), torch.no_grad():
        return _evaluate(model, batches, dist, amp)


def _evaluate(
    model: nn.Module, batches: Iterable[Batch], dist: DistContext, amp: torch.dtype | None
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    sums: torch.Tensor | None = None
    num_classes = 0
    try:
        for batch in batches:
            if len(batch) == 0:  # this rank's share of a last partial batch is empty
                if is_sharded(model):  # an FSDP2 unit gathers its weights with every rank: run it all the same
                    run_model(model, torch.zeros((1, *batch.x.shape[1:]), dtype=batch.x.dtype, device=batch.x.device))
                continue
            with autocast(batch.x.device, amp):
                logits = run_model(model, model_input(batch, model))  # (B, K): on its own view
            logits = logits.float()
            num_classes = logits.shape[-1]
            keep = batch.y != UNLABELED
            logits, y = logits[keep], batch.y[keep]
            k = min(5, num_classes)
            topk = logits.topk(k, dim=-1).indices  # (B, k)
            hit = topk == y[:, None]  # (B, k)
            step = torch.stack(
                [
                    hit[:, 0].sum().float(),
                    hit.any(dim=-1).sum().float(),
                    F.cross_entropy(logits, y, reduction="sum") if y.numel() else logits.sum() * 0,
                    torch.tensor(float(y.numel()), device=logits.device),
                ]
            )
            sums = step if sums is None else sums + step
    finally:
        model.train(was_training)
    if sums is None:
        sums = torch.zeros(4)
    dev = next((p.device for p in model.parameters()), sums.device)
    sums = dist.all_reduce_sum(sums.to(dev)).cpu()
    n = max(1.0, float(sums[3]))
    out = {"top1": 100.0 * float(sums[0]) / n, "loss": float(sums[2]) / n, "n": int(sums[3])}
    if num_classes > 5:
        out["top5"] = 100.0 * float(sums[1]) / n
    return out


class RecordSink(Protocol):
    """What else receives each record (the run's loggers: TensorBoard, MLflow)."""

    def write(self, record: dict[str, Any]) -> None: ...


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only; without a path the
    records are only kept in memory).

    Records are one per epoch (``kind: train``: the epoch's mean loss terms and learning rate) and
    one per evaluation (``kind: eval``), each with its ``stage``; :meth:`records` reads them back.
    A sink given to :meth:`attach` gets each record after ``metrics.jsonl`` has it.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._kept: list[dict[str, Any]] = []  # this process's records, for a run without a folder
        self._sink: RecordSink | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def attach(self, sink: RecordSink | None) -> None:
        """Send every later record to ``sink`` too (None: to nothing else)."""
        self._sink = sink

    def write(self, record: dict[str, Any]) -> None:
        self._kept.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._sink is not None:
            self._sink.write(record)

    def records(self, stage: str | None = None) -> list[dict[str, Any]]:
        """The records of ``stage`` (None: all), in order: from ``metrics.jsonl`` when there is one
        (earlier sessions of a resumed run included), else those written by this process."""
        rows = self._kept
        if self.path is not None and self.path.is_file():
            with self.path.open() as f:
                rows = [r for r in map(_json_or_none, f) if r is not None]
        return [r for r in rows if stage is None or r.get("stage") == stage]


def _json_or_none(line: str) -> dict[str, Any] | None:
    """A record of ``metrics.jsonl``; None for a blank line or one cut short by a crash."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
