"""Distillation in your own training loop: any loss, any teacher, the taps, without the engine.

A :class:`Distiller` is an ``nn.Module`` holding the student and the objective (with the
adapters its losses build); the teacher stays outside it (frozen, ``eval()``, no gradients).
Calling it on a batch runs the student with the taps the losses need, asks the teacher for its
outputs, and returns ``(loss, {term: value})``: the same flow of knowledge a ``dk`` run trains,
for plain PyTorch, Lightning or the Hugging Face ``Trainer``::

    distiller = dk.Distiller(student, teacher, losses={"ce": {}, "kd": {"T": 4}}, example=x[:8])
    optimizer = torch.optim.AdamW(distiller.parameters(), lr=1e-3)   # the student and the adapters
    for x, y in loader:
        loss, terms = distiller(x, y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import SetupInfo
from darkknowledge.losses.objective import Objective
from darkknowledge.teachers.base import Teacher
from darkknowledge.teachers.flow import Flow, Link
from darkknowledge.teachers.frozen import Frozen

ADAPTING = ("feature", "relation")
"""Knowledge types whose losses may build adapters from a dry run."""


def _size_and_device(x: Any) -> tuple[int, torch.device]:
    """Batch size and device of inputs (a tensor, or a mapping of tensors)."""
    first = next(iter(x.values())) if isinstance(x, Mapping) else x
    return len(first), first.device


class Distiller(nn.Module):
    """A student, a teacher and an objective, for a loop you write yourself.

    Args:
        student: Any ``nn.Module`` returning logits ``(B, K)`` (or an object with ``.logits``).
        teacher: A trained ``nn.Module`` (frozen here), any :class:`~darkknowledge.teachers.base.Teacher`
            that needs no trainable views (e.g. a :class:`~darkknowledge.teachers.mixture.Mixture`), or
            None for losses that read no teacher.
        losses: The objective, as in a recipe: ``{"ce": {}, "kd": {"T": 4, "alpha": 0.9}}`` (default ``{"kd": {}}``).
        example: A batch of inputs for the dry run that builds the losses' adapters; required
            when a feature or relation loss is used, so that ``parameters()`` holds the adapters
            before the optimizer is built.

    Raises:
        ConfigError: A bad loss config, a loss the teacher cannot feed, or a missing ``example``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Teacher | None = None,
        losses: Mapping[str, Mapping[str, Any] | None] | None = None,
        *,
        example: Any = None,
    ) -> None:
        super().__init__()
        objective = Objective.from_config(losses if losses is not None else {"kd": {}})
        provider = teacher if isinstance(teacher, Teacher) or teacher is None else Frozen(teacher, "teacher")
        if provider is not None and not objective.teacher_terms():
            provider = None  # nothing reads it: no teacher forward
        self.flow = Flow({"student": student}, [Link("student", objective, provider)])
        self.teacher = provider
        self.needs = self.flow.links[0].needs
        adapting = [n for n, t in objective.terms.items() if t.knowledge in ADAPTING]
        self._ready = False
        self._device: torch.device | None = None  # where the teachers were last moved
        if example is not None:
            self.setup(example)
        elif adapting:
            raise ConfigError(
                f"Distiller: losses {adapting} build adapters from a dry run; pass example=a batch of "
                "inputs (e.g. x[:8]) so that distiller.parameters() holds them before you build "
                "the optimizer"
            )

    @property
    def student(self) -> nn.Module:
        return self.flow.view_model("student")

    @property
    def objective(self) -> Objective:
        return self.flow.links[0].objective

    def _batch(self, x: Any, y: torch.Tensor | None, idx: torch.Tensor | None) -> Batch:
        needs = self.needs
        n, device = _size_and_device(x)
        if y is None:
            if needs is not None and needs.labels:
                raise ConfigError(f"Distiller: losses {list(self.objective.terms)} read labels: call distiller(x, y)")
            y = torch.full((n,), UNLABELED, dtype=torch.long, device=device)
        if idx is None:
            if needs is not None and needs.indices:
                raise ConfigError(
                    f"Distiller: losses {list(self.objective.terms)} read the samples' dataset indices "
                    "(a memory bank): call distiller(x, y, idx)"
                )
            idx = torch.arange(n, device=y.device)
        return Batch(x, y, idx)

    def _follow(self, batch: Batch) -> None:
        """Keep the teachers (a mixture's members included) on the inputs' device: they are not
        submodules, so ``.to()`` skips them. Moved only when the inputs' device changes."""
        device = batch.y.device
        if device != self._device:
            for teacher in self.flow.teachers:
                teacher.to(device)
            self._device = device

    def setup(self, x: Any, y: torch.Tensor | None = None) -> None:
        """The dry run: the losses read the shapes of one batch and build their adapters."""
        n, device = _size_and_device(x)
        labels = y if y is not None else torch.zeros(n, dtype=torch.long, device=device)  # shapes only
        batch = Batch(x, labels, torch.arange(n, device=device))
        self._follow(batch)
        self.flow.setup(batch, SetupInfo(num_samples=n, batch_size=n))
        adversarial = sorted(self.flow.adversaries())
        if adversarial:  # one loss and one optimizer over parameters() would train them the wrong way
            raise ConfigError(
                f"Distiller: losses with a discriminator ({', '.join(a[2:] for a in adversarial)}) need "
                "a second optimizer stepping against the student; train them with dk.distill or a "
                "recipe (the engine steps each discriminator as its own part)"
            )
        self._ready = True

    def forward(
        self, x: Any, y: torch.Tensor | None = None, idx: torch.Tensor | None = None, epoch: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, {term: value})`` for inputs ``x``, labels ``y`` (``-1``: unlabelled), dataset
        indices ``idx`` (memory-bank losses) at ``epoch`` (fractional; term schedules)."""
        if not self._ready:
            self.setup(x, y)
        batch = self._batch(x, y, idx)
        self._follow(batch)
        return self.flow(batch, epoch)
