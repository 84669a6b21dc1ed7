"""The run's side of :class:`~darkknowledge.schemes.context.Context`: what a plan may use.

A :class:`RunContext` gives a scheme fresh models from the recipe (the student of a seed starts
from the same weights as that seed's baseline), the pre-trained teachers (trained or loaded
once per run and shared across seeds), objectives from the recipe's ``losses``, frozen teachers
with the recipe's cache settings, the training data, and ``train``: one resumable stage on the
one engine, recorded in ``results.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic
from torch import nn

from darkknowledge.config import (
    ModelConfig,
    RunConfig,
    TeacherConfig,
    TrainConfig,
    deep_merge,
)
from darkknowledge.data import DatasetInfo
from darkknowledge.data.batch import input_name
from darkknowledge.engine.checkpoint import atomic_save, load_exported, load_weights
from darkknowledge.engine.metrics import evaluate
from darkknowledge.engine.task import Task
from darkknowledge.errors import ConfigError
from darkknowledge.losses.objective import Objective
from darkknowledge.runs.build import (
    build_model,
    build_objective,
    make_loaders,
    seed_everything,
)
from darkknowledge.schemes.context import Context
from darkknowledge.teachers.frozen import Frozen
from darkknowledge.validation import format_validation_error

if TYPE_CHECKING:
    from darkknowledge.runs.session import Session


class RunContext(Context):
    """One run's building blocks for a scheme.

    Args:
        session: The run's session (device, data, run folder, stages).
        cfg: The run's config (default: the session's).
        transfer: The recipe's ``scheme.params.transfer`` (None: each scheme's default).
    """

    def __init__(self, session: Session, cfg: RunConfig | None = None, transfer: bool | None = None) -> None:
        self.session = session
        self.cfg = cfg or session.cfg
        self.transfer = transfer
        self._teachers: dict[str, nn.Module] = {}
        self.exports: dict[str, nn.Module] = {}

    # ------------------------------------------------------------ facts
    @property
    def scheme_name(self) -> str:
        return self.cfg.scheme.name

    @property
    def info(self) -> DatasetInfo:
        return self.session.bundle.info

    @property
    def has_validation(self) -> bool:
        return self.session.bundle.val is not None

    def uses_transfer(self, scheme: Any) -> bool:
        if self.transfer is not None:
            return self.transfer
        return scheme if isinstance(scheme, bool) else bool(scheme.default_transfer)

    def stage_name(self, seed: int, part: str | None = None) -> str:
        method = ("+".join(self.cfg.losses) or "student") if self.scheme_name == "offline" else self.scheme_name
        return f"{method}-{part}-s{seed}" if part else f"{method}-s{seed}"

    # ------------------------------------------------------------ models
    def model(
        self, spec: ModelConfig | Mapping[str, Any] | None = None, seed: int | None = None, where: str = "student"
    ) -> nn.Module:
        if spec is None:
            spec = self.cfg.student
        elif isinstance(spec, Mapping):
            try:
                spec = ModelConfig(**spec)
            except pydantic.ValidationError as exc:
                raise ConfigError(format_validation_error(exc, where)) from None
        if seed is not None:
            seed_everything(seed)
        return build_model(spec, self.info, where)

    def student(self, seed: int) -> nn.Module:
        return self.model(None, seed)

    def objective(self, losses: Mapping[str, Any] | None = None, where: str = "losses") -> Objective:
        return build_objective(dict(losses if losses is not None else self.cfg.losses), where)

    def train_cfg(self, overrides: Mapping[str, Any] | None = None, where: str = "scheme.params") -> TrainConfig:
        if not overrides:
            return self.cfg.train
        try:
            return TrainConfig(**deep_merge(self.cfg.train.model_dump(), overrides))
        except pydantic.ValidationError as exc:
            raise ConfigError(format_validation_error(exc, where)) from None

    # ------------------------------------------------------------ teachers
    def teacher(self) -> nn.Module:
        if self.cfg.teacher is None:
            return self._missing_teacher()
        if "teacher" not in self._teachers:  # only this one: the `teachers:` list is trained when asked for
            self._teachers["teacher"] = self._pretrained(self.cfg.teacher, "teacher")
        return self._teachers["teacher"]

    def teachers(self) -> list[tuple[str, nn.Module]]:
        if not self.cfg.all_teachers():
            self._missing_teacher()
        out = []
        for where, spec in self.cfg.all_teachers():
            if where not in self._teachers:
                self._teachers[where] = self._pretrained(spec, where)
            out.append((where, self._teachers[where]))
        return out

    def _pretrained(self, spec: TeacherConfig, where: str) -> nn.Module:
        """The pre-trained teacher at config path ``where``: loaded, reused, or trained now."""
        return self.session.teacher(spec, where)[0]

    def frozen(self, model: nn.Module, name: str = "teacher") -> Frozen:
        return Frozen(model, name, cache=self.cfg.cache)

    def _missing_teacher(self) -> nn.Module:
        raise ConfigError(
            f"scheme {self.scheme_name!r} needs a pre-trained teacher: add a `teacher:` section "
            "(model name, and `checkpoint:` or `train:` settings) to the recipe"
        )

    # ------------------------------------------------------------ stages
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
        entries = self.session.train_stage(
            stage,
            role,
            task,
            seed,
            train_cfg=train_cfg,
            with_transfer=with_transfer,
            label=label or self.scheme_name,
            scheme_name=self.scheme_name,
        )
        self.exports[stage] = task.export_model()
        return entries

    def train_alone(
        self, stage: str, model: nn.Module, seed: int, role: str = "stage", train_cfg: TrainConfig | None = None
    ) -> dict[str, Any]:
        entry = self.session.train_alone(stage, role, model, seed, train_cfg=train_cfg)
        self.exports[stage] = model
        return entry

    def reuse(self, stage: str, model: nn.Module) -> bool:
        run = self.session.run
        stage_dir = run.stage_dir(stage)
        if run.result(stage) is None or stage_dir is None:
            return False
        self.session.dist.barrier()  # the main rank writes model.pt; let it finish first
        path = stage_dir / "model.pt"
        if not path.is_file():
            return False
        _, state = load_exported(path)
        load_weights(model, state, path, where=f"stage {stage!r}'s model")
        return True

    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        s = self.session
        model.to(s.device)
        _, test_loader, _ = make_loaders(
            self.cfg, s.bundle, seed, s.device, s.dist, train=False, primary=input_name(model)
        )
        try:
            return evaluate(model, test_loader, s.dist)
        finally:
            model.to("cpu")

    def record(self, entry: dict[str, Any]) -> None:
        self.session.run.add_result(entry, self.cfg.name)

    def stage_dir(self, stage: str) -> Path | None:
        return self.session.run.stage_dir(stage)

    def write_file(self, stage: str, name: str, payload: Any) -> Path | None:
        folder = self.stage_dir(stage)
        if folder is None or not self.session.dist.is_main:
            return None
        atomic_save(payload, folder / name)
        return folder / name
