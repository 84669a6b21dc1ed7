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

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from darkknowledge.config import RunConfig, TeacherConfig, TrainConfig
from darkknowledge.data import DataBundle, DatasetInfo, cache_dir
from darkknowledge.data.batch import input_name
from darkknowledge.data.bundle import TensorData, num_samples
from darkknowledge.engine.checkpoint import (
    check_export_fits,
    export_model,
    load_weights,
    read_export,
    state_hash,
)
from darkknowledge.engine.device import select_device, set_deterministic
from darkknowledge.engine.distributed import init_distributed
from darkknowledge.engine.eta import RunClock
from darkknowledge.engine.loggers import Loggers, check_loggers, open_loggers
from darkknowledge.engine.metrics import MetricsLog
from darkknowledge.engine.task import Task
from darkknowledge.engine.trainer import Trainer
from darkknowledge.errors import CheckpointError, ConfigError
from darkknowledge.models import count_params
from darkknowledge.runs.build import (
    build_data,
    build_model,
    build_objective,
    make_loaders,
    model_spec,
    seed_everything,
    with_views,
)
from darkknowledge.runs.diagnosis import loss_drop
from darkknowledge.runs.lock import RunLock
from darkknowledge.runs.measures import entry_measures, teacher_measures
from darkknowledge.runs.profiling import Profiler
from darkknowledge.runs.resume import FinishedStage, open_on_ranks
from darkknowledge.runs.rundir import RunDir, read_identity
from darkknowledge.schemes.offline import offline_task

log = logging.getLogger(__name__)


class Session:
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
            if finished.reusable(task, export, train_cfg.epochs, train_cfg.scheduler.name):
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
        )
        try:
            result = trainer.fit(resume=self.resume)
        except BaseException:
            if self.loggers is not None:
                self.loggers.failed()
            raise
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
        train_data = getattr(train_loader, "data", None)
        common = {
            "seed": seed,
            "scheme": scheme_name,
            "method": label,
            "epochs": train_cfg.epochs,
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

    # ------------------------------------------------------------------ teacher
    def teacher_key(self, spec: TeacherConfig | None = None, where: str = "teacher") -> str:
        """Identity of a teacher trained by this config: model, data, training, seed."""
        cfg = self.cfg
        spec = spec if spec is not None else cfg.teacher
        assert spec is not None  # asked for a recipe with a teacher
        ident = {
            # `input`, `width`, ... only when set: teachers keep the keys they had before those fields existed
            "teacher": spec.model_dump(
                mode="json",
                exclude={"checkpoint", "reuse"}
                | {f for f in _LATER_FIELDS if getattr(spec, f) == TeacherConfig.model_fields[f].default},
            ),
            # only what differs from the defaults: a new engine option keeps existing teachers valid
            "train": cfg.teacher_train(spec, where).model_dump(mode="json", exclude_defaults=True),
            "data": {
                "fingerprint": self.bundle.info.fingerprint,
                "batch_size": cfg.data.batch_size,
                "augment": cfg.data.augment.model_dump(mode="json"),
                "val_fraction": cfg.data.val_fraction,
            },
            "world_size": self.dist.world_size,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def teacher_is_cached(self, where: str) -> bool:
        """Whether the teacher at config path ``where`` (``teacher``, ``teachers.0``) will be reused from the
        cache of trained teachers instead of trained (the run's ETA leaves it out of the plan)."""
        spec: TeacherConfig | None = None
        if where == "teacher":
            spec = self.cfg.teacher
        elif where.startswith("teachers.") and where.removeprefix("teachers.").isdigit():
            index = int(where.removeprefix("teachers."))
            spec = self.cfg.teachers[index] if index < len(self.cfg.teachers) else None
        if spec is None or spec.checkpoint or not spec.reuse:
            return False
        return (cache_dir() / "teachers" / f"{spec.name}-{self.teacher_key(spec, where)}.pt").is_file()

    def teacher(self, spec: TeacherConfig | None = None, where: str = "teacher") -> tuple[nn.Module, dict[str, Any]]:
        """A teacher (default ``cfg.teacher``): loaded from its checkpoint, reused from the cache,
        or trained now. ``where`` is its config path (``teacher``, ``teachers.0``) and stage name.

        A checkpoint is checked before it is used: readable, a well-formed export, trained on
        inputs of this run's shape and classes (else ``CheckpointError`` naming both). A cached
        trained teacher that cannot be read is deleted with a warning and trained again.
        """
        cfg = self.cfg
        spec = spec if spec is not None else cfg.teacher
        if spec is None:
            raise ConfigError(
                f"this run has no {where}: add a `{where}:` section (a model name, or a checkpoint) to the recipe"
            )
        info = self.bundle.info
        if spec.checkpoint:
            hint = f"Point {where}.checkpoint at an exported model (student.pt, model.pt), or drop it to train one."
            try:
                payload = read_export(spec.checkpoint, hint=hint)
                shape = info.input_shape_of(spec.input, f"{where}.input")
                check_export_fits(
                    payload, spec.checkpoint, info.name, shape, info.num_classes, where=f"{where}.checkpoint"
                )
            except CheckpointError as exc:
                text = str(exc)
                raise CheckpointError(text if text.startswith(where) else f"{where}.checkpoint: {text}") from None
            model = build_model(spec, info, where)
            entry = {
                "name": where,
                "role": "teacher",
                "model": spec.name,
                "seed": None,
                "params": count_params(model),
                "source": spec.checkpoint,
                "train_seconds": 0.0,
            }
            recorded = payload.get("result")
            recorded = recorded if isinstance(recorded, dict) else {}
            entry.update({k: recorded[k] for k in ("last_acc", "best_acc") if k in recorded})
            entry.update(teacher_measures(self, model, self.cfg.seed, train_split=False))
            self._profile_teacher(entry, model)
            self.run.add_result(entry, cfg.name)
            return self._as_reference(model, where), entry
        cached = cache_dir() / "teachers" / f"{spec.name}-{self.teacher_key(spec, where)}.pt"
        if spec.reuse and cached.is_file():
            reused = _reuse_teacher(cached, spec, info, where)
            if reused is not None:
                model, payload = reused
                entry = {**payload["result"], "name": where, "reused_from": str(cached), "train_seconds": 0.0}
                log.info("reusing the teacher trained earlier: %s (hash %s)", cached, state_hash(model))
                self.clock.skip(where, spec.seed)
                if "ece" not in entry:  # cached before entries recorded it
                    entry.update(teacher_measures(self, model, spec.seed, train_split=False))
                self._profile_teacher(entry, model)
                self.run.add_result(entry, cfg.name)
                return self._as_reference(model, where), entry
        seed_everything(spec.seed)
        model = build_model(spec, info, where)
        entry = self.train_alone(where, "teacher", model, spec.seed, train_cfg=cfg.teacher_train(spec, where))
        if self.dist.is_main and spec.reuse:
            export_model(model, cached, model_spec(model), {"result": entry})
        return self._as_reference(model, where), entry

    def _as_reference(self, model: nn.Module, where: str) -> nn.Module:
        """``model``, kept as :attr:`reference` when it is the run's one teacher."""
        if where == "teacher" and len(self.cfg.all_teachers()) == 1:
            self.reference = model
        return model

    def _profile_teacher(self, entry: dict[str, Any], model: nn.Module) -> None:
        """A teacher not trained here is profiled on this machine (a cached entry's latency is another run's)."""
        entry.pop("profile", None)
        if self.dist.is_main and (found := self.profiler(model, model_spec(model))) is not None:
            entry["profile"] = found


_LATER_FIELDS = ("input", "width", "depth", "ops", "quantize")
"""Model-spec fields added after teachers were first cached: in a teacher's key only when set."""


def _accuracies(metrics: dict[str, float]) -> dict[str, Any]:
    return {"last_acc": metrics["top1"], "last_top5": metrics.get("top5")}


def _reuse_teacher(
    cached: Path, spec: TeacherConfig, info: DatasetInfo, where: str
) -> tuple[nn.Module, dict[str, Any]] | None:
    """The trained teacher in the cache file ``cached``, or None (with a warning, the file
    deleted) when it cannot be read or does not fit: the caller then trains it again."""
    try:
        payload = read_export(cached)
        if not isinstance(payload.get("result"), dict):
            raise CheckpointError(f"{str(cached)!r} lacks the teacher's recorded result")
        model = build_model(spec, info, where)
        load_weights(model, payload["state_dict"], cached, where="cached teacher")
    except (CheckpointError, ConfigError) as exc:
        log.warning(
            "the cached trained teacher %s is unreadable (%s); deleting it and training the teacher again", cached, exc
        )
        cached.unlink(missing_ok=True)
        return None
    return model, payload
