"""A session: one invocation's device, distributed context, data, run folder and stages.

A *stage* trains one model (a teacher, a baseline, a distilled student) with the one
engine and records one entry in ``results.json``. On ``--resume`` a finished stage is
skipped (its model is reloaded) and an unfinished one continues from its ``last.pt``.

The session holds its run folder's lock from the start (one writer per folder, see
:mod:`~darkknowledge.runs.lock`) and, before anything is built, checks that the folder may be
written, or resumed (:mod:`~darkknowledge.runs.resume`).

Resuming a finished stage:

- Its teacher must be the one it was trained with: each entry records its teacher weights'
  hash (``teacher_hash``); another teacher is refused (delete the stage folder to train the
  stage again against the new one).
- ``train.epochs`` larger than the stage ran *extends* it: it continues from its ``last.pt``
  for the extra epochs, and its entry records the new count (and ``extended_from``). The LR
  schedule is the config's over the new epoch count, taken up at the step reached: ``constant``,
  ``step`` and ``multistep`` schedules (and warm-up) do not depend on the total and continue
  exactly as a run planned that long from the start; ``cosine`` does, so the rate jumps from
  its end value back to its value at that point of the longer cosine and decays to its floor at
  the new last epoch (a warm restart; a warning says so). A smaller ``train.epochs`` is refused.
- A ``model.pt`` that cannot be read is rebuilt from the stage's ``last.pt`` (its final weights),
  with a warning; a stage folder that is gone is trained again from the start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from darkknowledge.config import RunConfig, TrainConfig
from darkknowledge.data import DataBundle
from darkknowledge.data.batch import input_name
from darkknowledge.data.bundle import TensorData, num_samples
from darkknowledge.engine.checkpoint import (
    export_model,
)
from darkknowledge.engine.device import select_device, set_deterministic
from darkknowledge.engine.distributed import init_distributed
from darkknowledge.engine.eta import RunClock
from darkknowledge.engine.loggers import Loggers, check_loggers, marks_failure, open_loggers
from darkknowledge.engine.metrics import MetricsLog
from darkknowledge.engine.task import Task
from darkknowledge.engine.trainer import Trainer
from darkknowledge.errors import ConfigError
from darkknowledge.models import count_params
from darkknowledge.runs.build import (
    build_data,
    build_objective,
    make_loaders,
    model_spec,
    seed_everything,
    with_views,
)
from darkknowledge.runs.diagnosis import loss_drop
from darkknowledge.runs.lock import RunLock
from darkknowledge.runs.measures import entry_measures
from darkknowledge.runs.profiling import Profiler
from darkknowledge.runs.resume import FinishedStage, asked_budget, open_on_ranks, stage_budget
from darkknowledge.runs.rundir import RunDir, read_identity
from darkknowledge.runs.session_teachers import TeacherSource
from darkknowledge.schemes.offline import offline_task

log = logging.getLogger(__name__)


class Session(TeacherSource):
    """Shared state of one run.

    Args:
        cfg: The validated config.
        run_dir: The run folder (None: write nothing).
        resume: Continue the run in ``run_dir``.
        progress: Show progress bars on a terminal.
        bundle: Data already loaded (the Python API passes its own); else built from ``cfg``.
        identity: What writes the folder, recorded in ``run.json`` and checked by ``--resume``:
            ``{"command": "run" | "distill" | "train", "model": "student" | "teacher" | None}``
            (default: the Python API); the recipe name is added.
        loggers: Open the loggers of the config's ``log`` section (TensorBoard, MLflow); the
            preflight's session, which trains nothing, opens none.

    ``reference`` is the run's one pre-trained teacher once :meth:`teacher` has it (None before, and in a run
    with several teachers or none): baseline and student entries record their fidelity to it
    (``agreement``, ``kl_to_teacher``; see :mod:`~darkknowledge.runs.measures`).

    ``clock`` holds the run's plan for the ETA (a command sets it; see engine/eta.py). Close the
    session (``with``, or :meth:`close`) to release the folder and close the loggers; a stage that
    fails marks the MLflow run failed.

    Raises:
        ConfigError: ``resume`` without a run folder, an unusable folder, a folder that holds
            another run (without ``resume``), or a config that differs from the recorded one.
        CheckpointError: The folder was written by another command.
        RunFolderBusyError: Another process writes the folder.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path | None,
        resume: bool = False,
        progress: bool = True,
        bundle: DataBundle | None = None,
        identity: Mapping[str, Any] | None = None,
        loggers: bool = True,
    ) -> None:
        self.cfg, self.resume, self.progress = cfg, resume, progress
        if resume and run_dir is None:
            raise ConfigError(
                "resume: there is no run folder to continue; give the folder of the run (--out DIR, "
                "or out= in the Python API)"
            )
        loggers = loggers and bool(cfg.log.asked())
        if loggers:
            check_loggers(cfg.log, run_dir)  # before the folder is written
        self.clock = RunClock()
        self.reference: nn.Module | None = None
        wants_cuda = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
        self.dist = init_distributed("cuda" if wants_cuda else "cpu")
        self.identity = {"command": "api", "model": None, **(identity or {}), "name": cfg.name}
        self.lock = self._open_run_folder(run_dir)
        self.device = select_device(cfg.train.device, self.dist.local_rank if self.dist.enabled else None)
        set_deterministic(cfg.train.deterministic)
        self.bundle = with_views(cfg, bundle) if bundle is not None else build_data(cfg)
        self.run = RunDir(self._run_dir, writer=self.dist.is_main, fresh=not resume)
        self.metrics = MetricsLog(self.run.metrics_path)
        train = self.bundle.train  # TensorData: int64 inputs are token ids (a split that is not one is not read)
        token_ids = isinstance(train, TensorData) and train.x.dtype == torch.int64
        self.profiler = Profiler(cfg.profile, self.bundle.info, cfg.data.batch_size, token_ids=token_ids)
        self.run.write_config(cfg.model_dump(mode="json"))
        if self.run.path is not None and read_identity(self.run.path) is None:
            self.run.write_identity({**self.identity, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.loggers: Loggers | None = None
        if loggers and self.dist.is_main:
            self.loggers = open_loggers(
                cfg.log,
                self.run.path,
                name=cfg.name,
                config=cfg.model_dump(mode="json"),
                resume=resume,
                records=self.metrics.records(),
            )
            self.metrics.attach(self.loggers)

    def _open_run_folder(self, run_dir: Path | None) -> RunLock | None:
        self._run_dir, lock = open_on_ranks(
            self.dist, run_dir, self.cfg.model_dump(mode="json"), self.identity, self.resume
        )
        return lock

    def close(self, failed: bool = False, interrupted: bool = False) -> None:
        """Close the loggers (the MLflow run ends ``FINISHED``, ``FAILED`` or ``KILLED``) and release the
        run folder's lock (both also happen when the session is collected or the process ends)."""
        if self.loggers is not None:
            self.loggers.close(failed, interrupted)
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(failed=kind is not None, interrupted=kind is not None and issubclass(kind, KeyboardInterrupt))

    # ------------------------------------------------------------------ stages
    def train_stage(
        self,
        stage: str,
        role: str,
        task: Task,
        seed: int,
        train_cfg: TrainConfig | None = None,
        with_transfer: bool = False,
        label: str | None = None,
        scheme_name: str = "offline",
        as_teacher: bool = False,
    ) -> list[dict[str, Any]]:
        """Train ``task`` as one resumable stage; its models are trained in place.

        Args:
            stage: Stage name (run-folder subdirectory, results entry name).
            role: Role of the primary model in the report (``teacher``, ``baseline``, ``student``).
            task: The stage's task (e.g. a scheme's plan).
            seed: Seed of the data order (and recorded in the entry).
            train_cfg: Training settings (default: the run's ``train``).
            with_transfer: Append the unlabeled transfer set to the training data.
            label: The report's method column (default: the scheme's losses).
            scheme_name: Registered name of the scheme, recorded in the entries.
            as_teacher: Measure the primary model as a teacher whatever its role (``dk.train``: a
                teacher to be): its calibration and its fit of the training split (runs/measures.py).

        Returns:
            The results entries: the primary model first, then one per other evaluated model
            (peers, heads, ensembles) named ``<stage>:<model>``.
        """
        done = self.run.result(stage) if self.resume else None
        stage_dir = self.run.stage_dir(stage)
        export = task.export_model()
        train_cfg = train_cfg or self.cfg.train
        extended_from = None
        if done is not None and stage_dir is not None:
            finished = FinishedStage(self.run.path, stage, done, stage_dir)
            if finished.reusable(task, export, stage_budget(done, train_cfg), train_cfg.scheduler.name):
                self.clock.skip(stage, seed)
                members = [r for r in self.run.results if r["name"].startswith(f"{stage}:")]
                return [done, *members]
            extended_from = finished.extended_from
        seed_everything(seed)
        own = task.training_data(seed, self.device, self.dist)  # e.g. synthetic batches: the split is not read
        train_loader, test_loader, val_loader = make_loaders(
            self.cfg,
            self.bundle,
            seed,
            self.device,
            self.dist,
            with_transfer=with_transfer,
            train=own is None,
            primary=input_name(export),
        )
        train_loader = own if own is not None else train_loader
        trainer = Trainer(
            task,
            train_loader,
            test_loader,
            train_cfg,
            self.device,
            stage=stage,
            run_dir=stage_dir,
            val_loader=val_loader,
            dist=self.dist,
            metrics=self.metrics,
            config=self.cfg.model_dump(mode="json"),
            progress=self.progress,
            clock=self.clock.begin(stage, seed),
            restore_best=as_teacher,  # dk.train: the teacher-to-be is selected on the validation split
        )
        with marks_failure(self.loggers):
            result = trainer.fit(resume=self.resume)
        task.to(torch.device("cpu"))
        primary = task.primary
        log.info(
            "[%s] done: test acc %.2f (best-epoch %.2f), %.1fs",
            stage,
            result.last[primary]["top1"],
            result.best["top1"],
            result.train_seconds,
        )
        models = task.eval_models()
        facts = task.describe()
        selected = result.best["selected_on"] == "val"
        train_data = getattr(train_loader, "data", None)
        common = {
            "seed": seed,
            "scheme": scheme_name,
            "method": label,
            "epochs": result.epochs,  # a budget in steps: the epochs it spans, the last one cut short
            "budget": asked_budget(train_cfg),  # what the config asked for (epochs, steps or min_steps)
            "steps": result.steps,
            "loss_drop": loss_drop(self.metrics.records(stage)),  # % over the last epoch: still learning?
            "train_seconds": round(result.train_seconds, 3),
            "losses": sorted(facts.get("losses", ())),
            "train_samples": num_samples(train_data) if train_data is not None else None,
            "transfer": bool(
                own is None
                and with_transfer
                and self.cfg.data.use_transfer
                and self.bundle.transfer is not None
                and num_samples(self.bundle.transfer)
            ),
            "teacher_hash": task.fingerprint(),  # a resume of this stage must see the same teacher
        }
        if extended_from is not None:
            common["extended_from"] = extended_from
        entry = {
            "name": stage,
            "role": role,
            "model": model_spec(export)["name"],
            **common,
            "params": count_params(export),
            "extra_params": facts.get("adapter_params", 0),
            **_accuracies(result.last[primary]),
            "best_acc": result.best["top1"],
            "best_epoch": result.best["epoch"],
            "best_selected_on": result.best["selected_on"],
            # on the validation split (None without one): the delivered weights', the selected epoch's for dk.train
            "val_acc": result.best["score"] if as_teacher and selected else _last_val(result.history, primary),
        }
        if "cache" in facts:
            entry["teacher_cache"] = facts["cache"]
        for key in ("synthesizer", "generator_params"):
            if key in facts:
                entry[key] = facts[key]
        # fidelity to the teacher; a teacher's calibration and training fit
        entry.update(entry_measures(self, "teacher" if as_teacher else role, export, seed))
        if self.dist.is_main and (found := self.profiler(export, model_spec(export))) is not None:
            entry["profile"] = found  # size, FLOPs, CPU latency: the report's student table
        entries = [entry]
        for name, member in models.items():
            if name == primary:
                continue
            spec = model_spec(member)
            entries.append(
                {
                    "name": f"{stage}:{name}",
                    "role": name,
                    "model": name if spec.get("custom") else spec["name"],
                    **common,
                    "params": count_params(member),
                    "extra_params": 0,
                    "member_of": stage,
                    **_accuracies(result.last[name]),
                    "best_acc": None,
                    "best_selected_on": result.best["selected_on"],
                }
            )
        if stage_dir is not None and self.dist.is_main:
            export_model(
                export,
                stage_dir / "model.pt",
                model_spec(export),
                {"data": self.cfg.data.model_dump(mode="json"), "result": entry},
            )
        for e in entries[1:]:
            self.run.add_result(e, self.cfg.name)
        self.run.add_result(entry, self.cfg.name)  # last: a stage counts as done once its primary entry exists
        return entries

    def train_alone(
        self, stage: str, role: str, model: nn.Module, seed: int, train_cfg: TrainConfig | None = None
    ) -> dict[str, Any]:
        """Train ``model`` with cross-entropy alone (a teacher or a baseline); its entry."""
        task = offline_task(model, build_objective({"ce": {}}))
        return self.train_stage(stage, role, task, seed, train_cfg=train_cfg)[0]


def _last_val(history: list[dict[str, Any]], primary: str) -> float | None:
    """Top-1 (%) of ``primary`` on the validation split at the stage's last evaluation (None: no split)."""
    val = history[-1].get("val") if history else None
    return None if not val or primary not in val else float(val[primary]["top1"])


def _accuracies(metrics: dict[str, float]) -> dict[str, Any]:
    return {"last_acc": metrics["top1"], "last_top5": metrics.get("top5")}
