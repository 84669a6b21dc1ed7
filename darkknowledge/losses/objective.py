"""The total objective: a weighted sum of named loss terms, each with a weight schedule.

A recipe's ``losses:`` mapping becomes one :class:`Objective`::

    losses:
      ce: {weight: 0.1}
      kd: {T: 4, alpha: 1.0, weight: 0.9}
      kd_hot: {loss: kd, T: 8, warmup_epochs: 5}   # a second kd term under its own name

Reserved keys per term: ``loss`` (registry name, default: the term's name), ``weight``
(default 1), ``warmup_epochs`` (linear ramp of the weight from 0, default 0 = constant), and
``start_epoch``/``stop_epoch`` (the term is active in ``[start, stop)`` epochs; e.g. a FitNets
hint stage: ``hint: {stop_epoch: 5}`` with ``kd: {start_epoch: 5}``). Everything else goes to
the loss's constructor and is validated against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses import create_loss
from darkknowledge.losses.base import DistillLoss, Needs, Outputs, SetupInfo

RESERVED = ("loss", "weight", "warmup_epochs", "start_epoch", "stop_epoch")


@dataclass(frozen=True)
class TermSchedule:
    """When and how strongly a term counts: ``weight``, linear warm-up, active epoch window."""

    weight: float = 1.0
    warmup_epochs: float = 0.0
    start_epoch: float = 0.0
    stop_epoch: float | None = None

    def __call__(self, epoch_progress: float) -> float:
        """Weight at ``epoch_progress`` (epochs done, fractional)."""
        if epoch_progress < self.start_epoch or (self.stop_epoch is not None and epoch_progress >= self.stop_epoch):
            return 0.0
        if self.warmup_epochs <= 0:
            return self.weight
        return self.weight * min(1.0, (epoch_progress - self.start_epoch) / self.warmup_epochs)


def term_weight(weight: float, warmup_epochs: float, epoch_progress: float) -> float:
    """Weight of a term at ``epoch_progress``: linear warm-up then constant."""
    return TermSchedule(weight, warmup_epochs)(epoch_progress)


class Objective(nn.Module):
    """Named loss terms with weights; ``forward`` returns the total and every term's value.

    Args:
        terms: ``{name: DistillLoss}``.
        schedules: ``{name: TermSchedule}`` (default: weight 1, always on).
    """

    def __init__(self, terms: Mapping[str, DistillLoss], schedules: Mapping[str, TermSchedule] | None = None) -> None:
        super().__init__()
        if not terms:
            raise ConfigError("losses: the objective needs at least one term, e.g. {'ce': {}} or {'kd': {}}")
        self.terms = nn.ModuleDict(dict(terms))
        self.schedules = {k: (schedules or {}).get(k, TermSchedule()) for k in terms}
        self._needs: Needs | None = None

    @classmethod
    def from_config(cls, losses: Mapping[str, Mapping[str, Any]]) -> Objective:
        """Build from a recipe's ``losses:`` mapping (validated; see module docstring)."""
        terms, schedules = {}, {}
        for name, raw in losses.items():
            raw = dict(raw or {})
            loss_name = raw.pop("loss", name)
            sched = {k: raw.pop(k) for k in RESERVED[1:] if k in raw}
            for key, value in sched.items():
                if value is None and key == "stop_epoch":
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ConfigError(f"losses.{name}.{key}: must be a number >= 0 (got {value!r})")
            terms[name] = create_loss(loss_name, where=f"losses.{name}", **raw)
            schedules[name] = TermSchedule(**{k: float(v) if v is not None else None for k, v in sched.items()})
        return cls(terms, schedules)

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> Needs:
        """Bind every term to the models; returns the union of their needs."""
        needs = Needs()
        for term in self.terms.values():
            needs = needs | term.bind(student, teacher)
        self._needs = needs
        return needs

    @property
    def needs(self) -> Needs:
        if self._needs is None:
            raise RuntimeError("Objective.bind() must run before its needs are known")
        return self._needs

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        """Forward the dry-run outputs to every term (builds adapters)."""
        for term in self.terms.values():
            term.setup(student, teacher, info)

    def pretrain(self, teacher_batches: Callable[[], Iterator[Outputs]]) -> None:
        """Run every term's optional pre-training stage (see ``DistillLoss.pretrain``)."""
        for term in self.terms.values():
            term.pretrain(teacher_batches)

    def forward(
        self, student: Outputs, teacher: Outputs | None, batch: Batch, epoch_progress: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(total, {term: unweighted value})``; values stay tensors (no host sync)."""
        total: torch.Tensor | float = 0.0
        values: dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            value = term(student, teacher, batch)
            values[name] = value.detach()
            # a zero weight (warm-up start) still adds 0 * value, so every adapter gets a
            # (zero) gradient each step, which DDP without find_unused_parameters requires
            w = self.schedules[name](epoch_progress)
            weighted = value if w == 1.0 else w * value
            total = weighted if isinstance(total, float) else total + weighted
        return total, values  # type: ignore[return-value]
