"""The engine task of a plan: a :class:`~darkknowledge.teachers.flow.Flow` and its teachers.

The flow is the trainable module (what the optimizer sees, what DDP wraps, what a checkpoint
holds); the teachers are run around it: their caches are built at ``attach``, they look ahead
at the batch stream, they move with the task to its device, an EMA teacher updates after each
step, and the frozen ones' weights are the task's fingerprint (a resume must see the same).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.data.tensors import TensorData
from darkknowledge.engine.task import MAIN, Part, Task
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import SetupInfo
from darkknowledge.models import count_params
from darkknowledge.teachers.base import combined_fingerprint
from darkknowledge.teachers.flow import Flow


class FlowTask(Task):
    """Trains a flow; evaluates ``evaluate`` each epoch and exports ``export``.

    Args:
        flow: The trainable module and its links.
        evaluate: Models to evaluate by name (must contain ``primary``); evaluation-only views
            (ensembles, early exits) are kept here, outside the trainable module.
        primary: The model whose accuracy selects the best epoch (the student row).
        export: The deployable model (default: ``evaluate[primary]``).
    """

    def __init__(
        self, flow: Flow, evaluate: Mapping[str, nn.Module], primary: str = "student", export: nn.Module | None = None
    ) -> None:
        self.flow = flow
        self._evaluate = dict(evaluate)
        self.primary = primary
        self._export = export

    @property
    def module(self) -> nn.Module:
        return self.flow

    def parts(self) -> list[Part]:
        """One part (the flow), or the flow less its adversaries then one part per adversary
        (a discriminator steps after each student step, with its own optimizer and ratio)."""
        adversaries = self.flow.adversaries()
        if not adversaries:
            return [Part(MAIN, self.flow)]
        return [
            Part(MAIN, self.flow, exclude=tuple(a.module for _, a in adversaries.values())),
            *(Part(name, a.module, a.optimizer, every=a.every) for name, (_, a) in adversaries.items()),
        ]

    def training_step(
        self, model: nn.Module, batch: Batch, epoch_progress: float, part: str = MAIN
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return model(batch, epoch_progress) if part == MAIN else model(batch, epoch_progress, part)

    @property
    def teachers(self) -> list[Any]:
        """Every teacher of the flow (members of mixtures included), each once."""
        return self.flow.teachers

    def attach(self, loader: Any, dist: Any = None) -> None:
        """Check the data gives what the losses read, then let the teachers (caches) and the flow see it."""
        self._check_labels(loader)
        for teacher in self.teachers:
            teacher.attach(loader, dist)
        self.flow.attach(loader)

    def dry_attach(self, loader: Any, dist: Any = None) -> None:
        """``attach`` without building the teachers' output caches (they are checked)."""
        self._check_labels(loader)
        for teacher in self.teachers:
            teacher.dry_attach(loader)
        self.flow.attach(loader)

    def _check_labels(self, loader: Any) -> None:
        """Labels for the terms that read them. Without a teacher, mixed inputs (mixup, cutmix),
        which carry no label, are not made: the loader keeps its other augmentations."""
        augment = getattr(loader, "augment", None)
        if augment is not None and augment.mixes and not self.teachers:
            loader.augment = augment.without_mixing()  # a teacher's own training, a baseline
        reading = [
            name
            for link in self.flow.links
            if link.needs is not None and link.needs.labels
            for name, term in link.objective.terms.items()
            if term.needs_spec.labels
        ]
        data = getattr(loader, "data", None)
        if reading and isinstance(data, TensorData) and data.num_labeled == 0:
            raise ConfigError(
                f"losses {sorted(set(reading))} read labels, but the training data has none; "
                "use losses that read only the teacher (e.g. kd: {alpha: 1})"
            )
        augment = getattr(loader, "augment", None)
        if reading and augment is not None and augment.mixes and augment.mix_prob >= 1:
            raise ConfigError(
                f"losses {sorted(set(reading))} read labels, but data.augment mixes every training input "
                "(mixup/cutmix with mix_prob 1) and a mixed input has none; use losses that read only the "
                "teacher (e.g. kd: {alpha: 1}), or set data.augment.mix_prob below 1"
            )

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        self.flow.setup(batch, info)
        for teacher in self.teachers:
            teacher.setup(batch)

    def prepare(self, loader: Iterable[Batch]) -> None:
        self.flow.prepare(loader)

    def batches(self, stream: Iterator[Batch]) -> Iterator[Batch]:
        for teacher in self.teachers:
            stream = teacher.wrap(stream)
        return stream

    def after_step(self, part: str = "main") -> None:
        for teacher in self.teachers:
            teacher.after_step()

    def to(self, device: torch.device) -> FlowTask:
        self.flow.to(device)
        for teacher in self.teachers:
            teacher.to(device)
        return self

    def channels_last(self) -> None:
        super().channels_last()
        for teacher in self.teachers:
            teacher.channels_last()

    def compile(self) -> None:
        super().compile()
        for teacher in self.teachers:
            teacher.compile()

    def release(self) -> None:
        self.flow.release()

    def eval_models(self) -> dict[str, nn.Module]:
        return dict(self._evaluate)

    def export_model(self) -> nn.Module:
        return self._export if self._export is not None else self._evaluate[self.primary]

    def fingerprint(self) -> str | None:
        return combined_fingerprint([h for h in (t.fingerprint() for t in self.teachers) if h is not None])

    def describe(self) -> dict[str, Any]:
        extra = count_params(self.flow, trainable_only=True) - count_params(self.export_model(), trainable_only=True)
        facts: dict[str, Any] = {"losses": self.flow.term_names(), "adapter_params": extra}
        caches = [t.describe()["cache"] for t in self.teachers if "cache" in t.describe()]
        if caches:
            facts["cache"] = caches[0] if len(caches) == 1 else caches
        return facts
