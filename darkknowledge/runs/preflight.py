"""The preflight: the whole run planned and dry-run on one batch before its first optimizer step.

``dk run``, ``dk distill`` and ``dk train`` call :func:`preflight` before the run folder is
written. It plays the scheme's plan through a :class:`PreflightContext`, whose stages do not
train: each builds its models, its adapters and its objective, probes every tap, opens every
teacher checkpoint, checks that the teacher-output cache can hold what the losses read, and
computes one training step's loss (no backward, no update) and one evaluation batch. So every
mistake that does not need trained weights (an unknown tap, a loss term without a teacher, a
shape that does not fit, a corrupt or mismatched teacher checkpoint, a cache that lacks a tap,
a stage path of a pipeline) stops the run before anything is trained or written.

What it cannot know: a teacher that is trained by the run is played by an untrained model of
its architecture (its shapes are the same); a loss that diverges after some steps.

The dry run uses throwaway models: every real stage builds its own again from its seed, so the
trained weights are the same with or without the preflight.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from darkknowledge.config import RunConfig, TeacherConfig, TrainConfig
from darkknowledge.data import DataBundle
from darkknowledge.data.batch import Batch, input_name, model_input
from darkknowledge.data.bundle import num_samples
from darkknowledge.engine.eta import PlannedStage
from darkknowledge.engine.optim import step_budget
from darkknowledge.engine.task import Task
from darkknowledge.errors import ShapeError
from darkknowledge.losses.base import SetupInfo, run_model
from darkknowledge.runs.build import (
    build_model,
    build_objective,
    make_loaders,
    seed_everything,
)
from darkknowledge.runs.context import RunContext
from darkknowledge.runs.session import Session
from darkknowledge.schemes.offline import offline_task

log = logging.getLogger(__name__)


class PreflightContext(RunContext):
    """A :class:`RunContext` whose stages are dry runs on one batch (nothing trains or is written).

    ``planned`` lists the stages played, in order, with their epochs and batches per epoch: the
    plan of the run's ETA (engine/eta.py).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.planned: list[PlannedStage] = []

    def stage_dir(self, stage: str) -> Path | None:
        return None  # a dry run writes nothing

    def write_file(self, stage: str, name: str, payload: Any) -> Path | None:
        return None

    def _pretrained(self, spec: TeacherConfig, where: str) -> nn.Module:
        """A teacher from a checkpoint is opened and checked; one the run would train is played
        by an untrained model of its architecture, after a dry run of its training stage."""
        if spec.checkpoint:
            return self.session.teacher(spec, where)[0]  # reads the file; the session writes nothing
        seed_everything(spec.seed)
        model = build_model(spec, self.info, where)
        self.train_alone(where, model, spec.seed, role="teacher", train_cfg=self.cfg.teacher_train(spec, where))
        return model

    def train(
        self,
        stage: str,
        task: Task,
        seed: int,
        role: str = "student",
        train_cfg: TrainConfig | None = None,
        with_transfer: bool = False,
        label: str | None = None,
    ) -> list[dict[str, Any]]:
        train_cfg = train_cfg or self.cfg.train
        batches = dry_run(self.session, stage, task, seed, train_cfg, with_transfer)
        epochs = step_budget(train_cfg, batches)[0]  # a budget in steps: the epochs it spans
        self.planned.append(PlannedStage.of(stage, seed, epochs, batches))
        self.exports[stage] = task.export_model()
        entry = {
            "name": stage,
            "role": role,
            "seed": seed,
            "scheme": self.scheme_name,
            "method": label,
            "model": stage,
            "losses": [],
            "epochs": epochs,
            "last_acc": math.nan,
            "best_acc": math.nan,
            "best_selected_on": None,
        }
        return [entry]

    def train_alone(
        self, stage: str, model: nn.Module, seed: int, role: str = "stage", train_cfg: TrainConfig | None = None
    ) -> dict[str, Any]:
        return self.train(
            stage, offline_task(model, build_objective({"ce": {}})), seed, role=role, train_cfg=train_cfg
        )[0]

    def reuse(self, stage: str, model: nn.Module) -> bool:
        return False

    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        s = self.session
        _, test_loader, _ = make_loaders(
            self.cfg, s.bundle, seed, s.device, s.dist, train=False, primary=input_name(model)
        )
        model.to(s.device)
        try:
            _forward_once(model, next(iter(test_loader)))
        finally:
            model.to("cpu")
        return {"top1": math.nan, "top5": math.nan, "loss": math.nan, "n": 0}

    def record(self, entry: dict[str, Any]) -> None:
        """Nothing is recorded by a dry run."""


def _forward_once(model: nn.Module, batch: Batch) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_model(model, model_input(batch, model))
    finally:
        model.train(was_training)


def dry_run(session: Session, stage: str, task: Task, seed: int, train_cfg: TrainConfig, with_transfer: bool) -> int:
    """One stage's set-up and one step's loss on its first batch, without an update; its batches per epoch.

    Teachers' output caches are checked (they hold what the losses read) but not built.
    """
    own = task.training_data(seed, session.device, session.dist)
    train_loader, test_loader, _ = make_loaders(
        session.cfg,
        session.bundle,
        seed,
        session.device,
        session.dist,
        with_transfer=with_transfer,
        train=own is None,
        primary=input_name(task.export_model()),
    )
    train_loader = own if own is not None else train_loader
    assert train_loader is not None  # made above unless the task brings its own
    task.to(session.device)
    try:
        task.dry_attach(train_loader, session.dist)  # caches checked, not built: a dry run's teachers run live
        train_loader.set_epoch(0)
        first = next(iter(train_loader))
        task.setup(
            first,
            SetupInfo(
                num_samples=num_samples(train_loader.data),
                batch_size=len(first),
                epochs=step_budget(train_cfg, len(train_loader))[0],
            ),
        )
        module = task.module
        module.train()
        with torch.no_grad():
            for part in task.parts():
                loss, _ = task.training_step(module, first, 0.0, part.name)
                if loss.dim() != 0:
                    raise ShapeError(
                        f"[{stage}] the training step of part {part.name!r} returned a loss of shape "
                        f"{tuple(loss.shape)}; it must be a scalar"
                    )
        test_batch = next(iter(test_loader))
        for model in task.eval_models().values():
            _forward_once(model, test_batch)
        log.debug("[%s] preflight: set up and one step's loss computed", stage)
        return len(train_loader)
    finally:
        task.release()
        task.to(torch.device("cpu"))


def preflight(
    cfg: RunConfig,
    plan: Callable[[PreflightContext], Any],
    transfer: bool | None = None,
    bundle: DataBundle | None = None,
    planned: list[PlannedStage] | None = None,
) -> DataBundle:
    """Play ``plan`` with a :class:`PreflightContext`: every stage dry-run on one batch, nothing written.

    Args:
        cfg: The validated config.
        plan: What the command will do, e.g. ``lambda ctx: scheme.run(ctx, seed, params)`` (one
            seed is enough: the other seeds build the same models).
        transfer: The recipe's ``scheme.params.transfer``.
        bundle: Data already loaded.
        planned: Filled with the stages played, in order (the run's plan for its ETA).

    Returns:
        The loaded data, for the real run to reuse.

    Raises:
        DarkKnowledgeError: Whatever the run would have failed on before its first update.
    """
    session = Session(cfg, None, progress=False, bundle=bundle, loggers=False)
    ctx = PreflightContext(session, transfer=transfer)
    plan(ctx)
    if planned is not None:
        planned.extend(ctx.planned)
    return session.bundle


__all__ = ["PreflightContext", "dry_run", "preflight"]
