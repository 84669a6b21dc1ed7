"""What a scheme may use to build and train its stages within one run.

A :class:`SchemeContext` is handed to ``Scheme.build``/``Scheme.run``. It gives fresh
models from the recipe (the student of a seed starts from the same weights as that seed's
baseline), the pre-trained teachers (trained or loaded once per run and shared across seeds),
objectives from the recipe's ``losses``, the training data, and ``train``: one resumable
stage on the one engine, recorded in ``results.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pydantic
from torch import nn

from darkknowledge.build import build_model, build_objective, seed_everything
from darkknowledge.config import ModelConfig, RunConfig, TrainConfig, deep_merge
from darkknowledge.data import DatasetInfo, TensorData
from darkknowledge.errors import ConfigError
from darkknowledge.losses.objective import Objective
from darkknowledge.validation import format_validation_error

if TYPE_CHECKING:
    from darkknowledge.schemes.base import Scheme
    from darkknowledge.session import Session


class SchemeContext:
    """One run's building blocks for a scheme.

    Args:
        session: The run's session (device, data, run folder, stages).
        cfg: The run's config (``cfg.scheme`` names the scheme).
    """

    def __init__(self, session: Session, cfg: RunConfig | None = None, transfer: bool | None = None) -> None:
        self.session = session
        self.cfg = cfg or session.cfg
        self.transfer = transfer
        self._teachers: dict[str, nn.Module] = {}
        self.exports: dict[str, nn.Module] = {}
        """Each trained stage's exported model, by stage name."""

    # ------------------------------------------------------------ facts
    @property
    def scheme_name(self) -> str:
        return self.cfg.scheme.name

    @property
    def info(self) -> DatasetInfo:
        """Class count, input shape and fingerprint of the data."""
        return self.session.bundle.info

    @property
    def train_data(self) -> TensorData:
        """The labelled training split (without the transfer set), as tensors."""
        data = self.session.bundle.train
        if not isinstance(data, TensorData):
            raise ConfigError(f"scheme {self.scheme_name!r} needs an in-memory tensor dataset, "
                              f"got {type(data).__name__}")
        return data

    def uses_transfer(self, scheme: type[Scheme] | bool) -> bool:
        """Whether students read the unlabeled transfer set: the recipe's
        ``scheme.params.transfer`` when given, else the scheme's (or the given) default."""
        if self.transfer is not None:
            return self.transfer
        return scheme if isinstance(scheme, bool) else scheme.default_transfer

    def stage_name(self, seed: int, part: str | None = None) -> str:
        """``<method>[-<part>]-s<seed>``, where method is the scheme (or the losses, offline)."""
        method = ("+".join(self.cfg.losses) or "student") if self.scheme_name == "offline" else self.scheme_name
        return f"{method}-{part}-s{seed}" if part else f"{method}-s{seed}"

    # ------------------------------------------------------------ models
    def model(self, spec: ModelConfig | Mapping[str, Any] | None = None, seed: int | None = None,
              where: str = "student") -> nn.Module:
        """A fresh zoo model (default: the recipe's student), seeded first when ``seed`` is given.

        Args:
            spec: A model config or mapping ``{name, params, checkpoint}``.
            seed: Seed everything before building (same seed, same spec: same weights).
            where: Config path for error messages (e.g. ``scheme.params.peers.1``).
        """
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
        """The recipe's student, initialised exactly as the baseline of ``seed`` is."""
        return self.model(None, seed)

    def objective(self, losses: Mapping[str, Any] | None = None) -> Objective:
        """An objective of the recipe's ``losses`` (or of ``losses``); a fresh one per call."""
        return build_objective(dict(losses if losses is not None else self.cfg.losses))

    def train_cfg(self, overrides: Mapping[str, Any] | None = None, where: str = "scheme.params") -> TrainConfig:
        """The recipe's ``train`` with ``overrides`` merged over it."""
        if not overrides:
            return self.cfg.train
        try:
            return TrainConfig(**deep_merge(self.cfg.train.model_dump(), overrides))
        except pydantic.ValidationError as exc:
            raise ConfigError(format_validation_error(exc, where)) from None

    # ------------------------------------------------------------ teachers
    def teacher(self) -> nn.Module:
        """The recipe's pre-trained ``teacher`` (trained, reused or loaded once per run)."""
        if self.cfg.teacher is None:
            return self._missing_teacher()
        if "teacher" not in self._teachers:  # only this one: the `teachers:` list is trained when asked for
            self._teachers["teacher"], _ = self.session.teacher(self.cfg.teacher, "teacher")
        return self._teachers["teacher"]

    def teachers(self) -> list[tuple[str, nn.Module]]:
        """Every pre-trained teacher of the recipe: ``teacher`` then ``teachers``, by config path."""
        if not self.cfg.all_teachers():
            self._missing_teacher()
        out = []
        for where, spec in self.cfg.all_teachers():
            if where not in self._teachers:
                self._teachers[where], _ = self.session.teacher(spec, where)
            out.append((where, self._teachers[where]))
        return out

    def _missing_teacher(self) -> nn.Module:
        raise ConfigError(f"scheme {self.scheme_name!r} needs a pre-trained teacher: add a `teacher:` section "
                          "(model name, and `checkpoint:` or `train:` settings) to the recipe")

    # ------------------------------------------------------------ stages
    def train(self, stage: str, scheme: Scheme, seed: int, role: str = "student",
              train_cfg: TrainConfig | None = None, with_transfer: bool = False,
              label: str | None = None) -> list[dict[str, Any]]:
        """Train ``scheme`` as one resumable stage (skipped when finished earlier and resuming).

        Returns:
            The results entries, primary model first (see ``Session.train_stage``).
        """
        entries = self.session.train_stage(stage, role, scheme, seed, train_cfg=train_cfg,
                                           with_transfer=with_transfer, label=label or self.scheme_name,
                                           scheme_name=scheme.registry_name or self.scheme_name)
        self.exports[stage] = scheme.export_model()
        return entries

    def train_alone(self, stage: str, model: nn.Module, seed: int, role: str = "stage",
                    train_cfg: TrainConfig | None = None) -> dict[str, Any]:
        """Train ``model`` with cross-entropy alone as one stage (e.g. generation 0)."""
        entry = self.session.train_alone(stage, role, model, seed, train_cfg=train_cfg)
        self.exports[stage] = model
        return entry
