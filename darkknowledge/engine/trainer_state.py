"""The trainer's stage state: its outcome (:class:`StageResult`) and its checkpoints.

``last.pt`` holds the whole training state (weights, each part's optimizer, scheduler and scaler,
the RNG streams, the history), written atomically by rank 0 after each epoch (with a budget in
steps, at most every ``STEP_BUDGET_SAVE_EVERY`` steps) and read back by a resumed stage;
``best.pt`` holds the weights of the best epoch, which a stage that selects on the validation
split (``restore_best``) ends with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from darkknowledge.engine.checkpoint import atomic_save, capture_rng, restore_rng, safe_load
from darkknowledge.engine.distributed import DistContext
from darkknowledge.engine.divergence import DivergenceWatch
from darkknowledge.engine.stepper import PartStepper
from darkknowledge.engine.task import Task
from darkknowledge.errors import CheckpointError

log = logging.getLogger(__name__)


STEP_BUDGET_SAVE_EVERY = 100
"""With a budget in steps, ``last.pt`` is written at the end of an epoch once this many steps have
passed since the last write (and after the last epoch): a small set's epochs are a step or two each,
and writing after every one of them would double the training time."""


@dataclass
class StageResult:
    """Outcome of one training stage.

    Attributes:
        stage: Stage name (run-folder subdirectory).
        last: Final evaluation per evaluated model, e.g. ``{"student": {"top1": 91.2, ...}}``.
        best: Best epoch of the primary model: ``{"epoch", "top1", "selected_on"}``.
        history: One record per evaluation.
        train_seconds: Wall time spent training (evaluation excluded), across resumes.
        steps: Optimizer steps (one part), or batches trained on (several parts).
        epoch_seconds: Training wall time of each epoch run by this call (evaluation excluded).
        epochs: Epochs the stage spans: ``train.epochs``, or those a ``train.steps`` budget needs.
    """

    stage: str
    last: dict[str, dict[str, float]] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    steps: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    epochs: int = 0


class StageCheckpoints:
    """The checkpoint side of :class:`~darkknowledge.engine.trainer.Trainer` (a mixin: it reads the
    trainer's attributes below)."""

    run_dir: Path | None
    dist: DistContext
    task: Task
    stage: str
    device: torch.device
    config: dict[str, Any] | None
    _watch: DivergenceWatch
    _saved_at: int
    _best: tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]] | None

    def _ckpt(self, name: str) -> Path | None:
        return self.run_dir / name if self.run_dir is not None else None

    def _save(self, name: str, payload: dict[str, Any]) -> None:
        path = self._ckpt(name)
        if path is not None and self.dist.is_main:
            atomic_save(payload, path)

    def _save_last(self, payload: dict[str, Any], step: int) -> None:
        """Write ``last.pt`` (its state passed the divergence check) and remember it as the last good one."""
        self._save("last.pt", payload)
        self._saved_at = step
        if self.run_dir is not None:
            self._watch.saved(step)
            self.task.saved(step)

    def _state(
        self, epoch: int, batch: int, step: int, result: StageResult, steppers: dict[str, PartStepper]
    ) -> dict[str, Any]:
        return {
            "format": 2,
            "kind": "train",
            "stage": self.stage,
            "module": self.task.module.state_dict(),
            "parts": {name: s.state_dict() for name, s in steppers.items()},
            "epoch": epoch,
            "batch": batch,
            "step": step,
            "rng": capture_rng(),
            "config": self.config,
            "teacher_hash": self.task.fingerprint(),
            "history": result.history,
            "best": result.best,
            "last": result.last,
            "train_seconds": result.train_seconds,
        }

    def _resume(self, steppers: dict[str, PartStepper], result: StageResult) -> tuple[int, int, int]:
        path = self._ckpt("last.pt")
        if path is None or not path.is_file():
            log.info("[%s] no checkpoint to resume from; starting fresh", self.stage)
            return 0, 0, 0
        state = safe_load(path, map_location=self.device)
        ours, theirs = self.task.fingerprint(), state.get("teacher_hash")
        if ours != theirs:
            raise CheckpointError(
                f"refusing to resume {str(path)!r}: it was trained with teacher weights {theirs}, "
                f"but this run's teacher has {ours}. Resuming would mix two teachers' knowledge; "
                "use the original teacher, or start a new run folder with --out."
            )
        parts = state.get("parts")
        if parts is None:  # format 1: one optimizer, saved under its own keys
            parts = {next(iter(steppers)): {k: state.get(k) for k in ("optimizer", "scheduler", "scaler")}}
        if set(parts) != set(steppers):
            raise CheckpointError(
                f"refusing to resume {str(path)!r}: it holds the parts {sorted(parts)}, "
                f"this task trains {sorted(steppers)}"
            )
        try:
            self.task.module.load_state_dict(state["module"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"cannot resume {str(path)!r}: its weights do not fit this stage's models (a "
                f"checkpoint of another recipe, or of an older darkknowledge?): {exc}"
            ) from None
        for name, stepper in steppers.items():
            stepper.load_state_dict(parts[name], stepper.part.module)
        restore_rng(state["rng"])
        result.history, result.best = list(state["history"]), dict(state["best"])
        result.last, result.train_seconds = dict(state["last"]), float(state["train_seconds"])
        log.info("[%s] resumed from epoch %d, batch %d", self.stage, state["epoch"], state["batch"])
        return int(state["epoch"]), int(state["batch"]), int(state["step"])

    def _select_best(self, result: StageResult) -> None:
        """Load the weights of the epoch best on the validation split (from memory, or ``best.pt``
        after a resume) and report their test metrics as ``last``."""
        if self._best is None:
            path = self._ckpt("best.pt")
            if path is None or not path.is_file():
                log.warning("[%s] no best epoch to select (best.pt is missing): keeping the last epoch", self.stage)
                return
            state = safe_load(path)
            weights, epoch = state["module"], int(state["best"]["epoch"])
            metrics = next((h["test"] for h in result.history if h["epoch"] == epoch), None)
        else:
            (weights, metrics), epoch = self._best, int(result.best["epoch"])
        self.task.module.load_state_dict(weights)
        if metrics is not None:
            result.last = metrics
        log.info("[%s] selected epoch %d on the validation split", self.stage, epoch)
