"""The total objective: a weighted sum of named loss terms, each with a weight schedule.

A recipe's ``losses:`` mapping becomes one :class:`Objective`::

    losses:
      ce: {weight: 0.1}
      kd: {T: 4, alpha: 1.0, weight: 0.9}
      kd_hot: {loss: kd, T: 8, warmup_epochs: 5}   # a second kd term under its own name

Each term is parsed once (:func:`parse_term`): ``loss`` (registry name, default: the term's
name), the schedule (:class:`TermSchedule`: ``weight``, ``warmup_epochs`` with
``warmup_shape``, ``start_epoch``, ``stop_epoch``), and everything else, the loss's own
parameters, validated against its constructor. The schedule is the one vocabulary every
scheme uses: a cohort's burn-in is ``start_epoch``, ONE's sigmoid ramp-up is
``warmup_shape: sigmoid``, FitNets' hint stage is ``stop_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, ItemsView, Iterable, Iterator, Mapping, ValuesView
from typing import TYPE_CHECKING, Any, Literal

import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses import create_loss
from darkknowledge.losses.base import DistillLoss, Needs, Outputs, SetupInfo
from darkknowledge.validation import format_validation_error

if TYPE_CHECKING:

    class Terms(nn.ModuleDict):
        """``Objective.terms`` as the type checker sees it: an ``nn.ModuleDict`` of loss terms."""

        def __getitem__(self, key: str) -> DistillLoss: ...
        def items(self) -> ItemsView[str, DistillLoss]: ...
        def values(self) -> ValuesView[DistillLoss]: ...

else:
    Terms = nn.ModuleDict


class TermSchedule(BaseModel):
    """When and how strongly a term counts (epochs are fractional: ``epoch + batch / batches``).

    Attributes:
        weight: The term's weight once fully on.
        warmup_epochs: Epochs from ``start_epoch`` over which the weight ramps up from 0 (0: none).
        warmup_shape: ``linear`` ramp, or ``sigmoid``: ``exp(-5 (1 - t)^2)`` (Laine & Aila 2017,
            the ramp-up of ONE's and the mean teacher's authors' code).
        start_epoch: The term is off before this epoch (e.g. a burn-in of cross-entropy alone).
        stop_epoch: The term is off from this epoch on (None: never), e.g. FitNets' hint stage.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(default=1.0, ge=0.0)
    warmup_epochs: float = Field(default=0.0, ge=0.0)
    warmup_shape: Literal["linear", "sigmoid"] = "linear"
    start_epoch: float = Field(default=0.0, ge=0.0)
    stop_epoch: float | None = Field(default=None, ge=0.0)

    def __call__(self, epoch_progress: float) -> float:
        """Weight at ``epoch_progress`` (epochs done, fractional)."""
        if epoch_progress < self.start_epoch or (self.stop_epoch is not None and epoch_progress >= self.stop_epoch):
            return 0.0
        if self.warmup_epochs <= 0:
            return self.weight
        t = min(1.0, (epoch_progress - self.start_epoch) / self.warmup_epochs)
        return self.weight * (t if self.warmup_shape == "linear" else math.exp(-5.0 * (1.0 - t) ** 2))


SCHEDULE_KEYS = tuple(TermSchedule.model_fields)
"""Keys of a term that schedule it; every other key (but ``loss``) is a parameter of the loss."""


def term_weight(weight: float, warmup_epochs: float, epoch_progress: float) -> float:
    """Weight of a term at ``epoch_progress``: linear warm-up then constant."""
    return TermSchedule(weight=weight, warmup_epochs=warmup_epochs)(epoch_progress)


def parse_term(name: str, raw: Mapping[str, Any] | None, where: str = "losses") -> tuple[DistillLoss, TermSchedule]:
    """One term of a ``losses:`` mapping: the loss (its parameters validated) and its schedule.

    Raises:
        ConfigError: Unknown loss, unknown or ill-typed parameter or schedule key (the message
            names ``<where>.<name>.<key>``).
    """
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"{where}.{name}: expected a mapping of parameters, e.g. {{T: 4}}, got {raw!r}")
    params = dict(raw or {})
    loss_name = params.pop("loss", name)
    if not isinstance(loss_name, str):
        raise ConfigError(f"{where}.{name}.loss: expected a loss name, got {loss_name!r}")
    schedule = {k: params.pop(k) for k in SCHEDULE_KEYS if k in params}
    try:
        sched = TermSchedule(**schedule)
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"{where}.{name}")) from None
    return create_loss(loss_name, where=f"{where}.{name}", **params), sched


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
        self.terms = Terms(dict(terms))
        self.schedules = {k: (schedules or {}).get(k, TermSchedule()) for k in terms}
        self._needs: Needs | None = None

    @classmethod
    def from_config(cls, losses: Mapping[str, Mapping[str, Any] | None], where: str = "losses") -> Objective:
        """Build from a recipe's ``losses:`` mapping (each term parsed by :func:`parse_term`)."""
        parsed = {name: parse_term(name, raw, where) for name, raw in losses.items()}
        return cls({n: p[0] for n, p in parsed.items()}, {n: p[1] for n, p in parsed.items()})

    def subset(self, names: Iterable[str]) -> Objective | None:
        """An objective of some of these terms (the same modules and schedules), or None if empty."""
        names = [n for n in self.terms if n in set(names)]
        return Objective({n: self.terms[n] for n in names}, {n: self.schedules[n] for n in names}) if names else None

    def teacher_terms(self) -> list[str]:
        """Names of the terms that read teacher outputs."""
        return [n for n, t in self.terms.items() if t.reads_teacher()]

    def temperatures(self) -> dict[str, float]:
        """``{term: T}`` of the terms that soften the teacher's logits at a temperature."""
        temps = {n: t.softening_temperature() for n, t in self.terms.items()}
        return {n: T for n, T in temps.items() if T is not None}

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
        return total, values  # type: ignore[return-value]  # a tensor: at least one term
