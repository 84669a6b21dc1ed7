"""What a scheme's plan may use of the run it is part of: the :class:`Context` interface.

Plans ask the context for fresh models (the student of a seed starts from the same weights as
that seed's baseline), the pre-trained teachers (trained or loaded once per run and shared
across seeds), objectives from the recipe's ``losses``, frozen teachers with the recipe's
cache settings, and ``train``: one resumable stage on the one engine, recorded in
``results.json``. The run layer implements it (``darkknowledge.runs.context.RunContext``); a
scheme imports nothing from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from darkknowledge.config import ModelConfig, RunConfig, TrainConfig
    from darkknowledge.data import DatasetInfo
    from darkknowledge.engine.task import Task
    from darkknowledge.losses.objective import Objective
    from darkknowledge.teachers.frozen import Frozen


class Context:
    """One run's building blocks for a scheme (see module docstring).

    Attributes:
        cfg: The run's config (``cfg.scheme`` names the scheme).
        exports: Each trained stage's exported model, by stage name.
    """

    cfg: RunConfig
    exports: dict[str, nn.Module]

    # ------------------------------------------------------------ facts
    @property
    def info(self) -> DatasetInfo:
        """Class count, input shape and fingerprint of the data."""
        raise NotImplementedError

    @property
    def has_validation(self) -> bool:
        """Whether the data has a validation split (``data.val_fraction``, or the dataset's own)."""
        raise NotImplementedError

    def uses_transfer(self, scheme: Any) -> bool:
        """Whether students read the unlabeled transfer set: the recipe's
        ``scheme.params.transfer`` when given, else the default of ``scheme`` (a scheme class's
        ``default_transfer``, or a bool)."""
        raise NotImplementedError

    def stage_name(self, seed: int, part: str | None = None) -> str:
        """``<method>[-<part>]-s<seed>``, where method is the scheme (or the losses, offline)."""
        raise NotImplementedError

    # ------------------------------------------------------------ building blocks
    def model(
        self, spec: ModelConfig | Mapping[str, Any] | None = None, seed: int | None = None, where: str = "student"
    ) -> nn.Module:
        """A fresh zoo model (default: the recipe's student), seeded first when ``seed`` is given."""
        raise NotImplementedError

    def student(self, seed: int) -> nn.Module:
        """The recipe's student, initialised exactly as the baseline of ``seed`` is."""
        raise NotImplementedError

    def objective(self, losses: Mapping[str, Any] | None = None, where: str = "losses") -> Objective:
        """A fresh objective of the recipe's ``losses`` (or of ``losses``)."""
        raise NotImplementedError

    def train_cfg(self, overrides: Mapping[str, Any] | None = None, where: str = "scheme.params") -> TrainConfig:
        """The recipe's ``train`` with ``overrides`` merged over it."""
        raise NotImplementedError

    def teacher(self) -> nn.Module:
        """The recipe's pre-trained ``teacher`` (trained, reused or loaded once per run)."""
        raise NotImplementedError

    def teachers(self) -> list[tuple[str, nn.Module]]:
        """Every pre-trained teacher of the recipe: ``teacher`` then ``teachers``, by config path."""
        raise NotImplementedError

    def frozen(self, model: nn.Module, name: str = "teacher") -> Frozen:
        """``model`` as a frozen teacher with the recipe's ``cache`` settings."""
        raise NotImplementedError

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
        """Train ``task`` as one resumable stage (skipped when finished earlier and resuming);
        returns the results entries, primary model first."""
        raise NotImplementedError

    def train_alone(
        self, stage: str, model: nn.Module, seed: int, role: str = "stage", train_cfg: TrainConfig | None = None
    ) -> dict[str, Any]:
        """Train ``model`` with cross-entropy alone as one stage (e.g. generation 0)."""
        raise NotImplementedError

    def reuse(self, stage: str, model: nn.Module) -> bool:
        """Load the weights of a stage this run finished earlier into ``model`` (False: none)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        """Test-split metrics of ``model`` (e.g. an ensemble of trained stages)."""
        raise NotImplementedError

    def record(self, entry: dict[str, Any]) -> None:
        """Add an entry to the run's results."""
        raise NotImplementedError

    def stage_dir(self, stage: str) -> Path | None:
        """The folder of stage ``stage`` (its checkpoints; a stage may keep files of its own there,
        e.g. a sample pool), or None when nothing is written (no run folder, a dry run)."""
        raise NotImplementedError

    def write_file(self, stage: str, name: str, payload: Any) -> Path | None:
        """Write ``payload`` (``torch.save``, atomically) as ``<stage folder>/<name>`` on the main
        process; the path, or None when nothing is written."""
        raise NotImplementedError
