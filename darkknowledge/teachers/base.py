"""The teacher-provider interface: anything that supplies "teacher" outputs to an objective.

A frozen pre-trained model (live, run ahead, or read from its output cache), a mixture of
several teachers, an exponential moving average of the student, the detached peers of a
cohort, the deepest classifier of the student itself, a virtual teacher made from the labels:
each is a :class:`Teacher` and gives the recipe's objective the same :class:`Outputs` (logits
and tapped features). Losses never know which one teaches them; schemes pick and wire them.

Life of a teacher inside a task:

1. ``request(logits, taps)`` at build time, once per objective it feeds: what the losses read.
   ``model`` is the module whose paths the taps name (None: the teacher has no features, and
   feature losses fail here with a message saying so).
2. ``attach(loader, dist)`` before the first batch (e.g. build or open an output cache),
   ``setup(batch)`` after the task's dry run (e.g. decide how many batches to run ahead).
3. ``wrap(stream)`` each epoch, ``__call__(batch, views)`` each step, ``after_step()`` after
   each optimizer step. ``views`` are this step's outputs of the task's trainable views
   (peers, heads): online teachers are made from them, frozen ones ignore them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import Outputs
from darkknowledge.taps import validate_taps

Views = Mapping[str, Outputs]
"""This step's outputs of a task's trainable views, by view name."""


class Teacher:
    """Base class of teacher providers (see the module docstring).

    Attributes:
        name: How messages and reports call it, e.g. ``teacher``, ``teachers.1``, ``peer1``.
        model: The module whose paths the teacher taps name, or None (no features).
        standalone: Its outputs depend on the batch alone and do not change while the student
            trains (a frozen model): losses that pre-train on teacher outputs may use it.
        logits: Whether it has logits to give.
    """

    name: str = "teacher"
    model: nn.Module | None = None
    standalone: bool = False
    logits: bool = True
    without_features: str = "use logit losses (kd, dkd, dist, ...) with it"
    """What to do instead when a loss reads features this teacher does not have."""

    def __init__(self) -> None:
        self.need_logits = False
        self.taps: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """A short description for messages, e.g. ``the frozen teacher 'teacher'``."""
        return f"teacher {self.name!r}"

    def request(self, logits: bool, taps: tuple[str, ...]) -> None:
        """Record that an objective reads these outputs (the union over every request is given).

        Raises:
            ConfigError: The teacher cannot give them (no logits, no features).
            TapError: A tap path names no module of ``model``.
        """
        if logits and not self.logits:
            raise ConfigError(f"{self.kind} gives no logits, but a loss reads the teacher's logits")
        if taps:
            if self.model is None:
                raise ConfigError(
                    f"{self.kind} has no features to tap (a loss reads teacher features {list(taps)}); "
                    f"{self.without_features}"
                )
            validate_taps(self.model, taps, self.kind)
        self.need_logits = self.need_logits or logits
        self.taps = tuple(dict.fromkeys(self.taps + tuple(taps)))

    def members(self) -> list[Teacher]:
        """Teachers this one is made of (their lifecycle is run by the task, each once)."""
        return []

    def view_taps(self) -> dict[str, tuple[str, ...]]:
        """Taps this teacher reads from the task's trainable views (online teachers), by view."""
        return {}

    def __call__(self, batch: Batch, views: Views | None = None) -> Outputs:
        """The teacher's outputs for ``batch``: logits ``(B, K)`` and the requested features."""
        raise NotImplementedError

    # ------------------------------------------------------------ lifecycle (defaults: nothing)
    def attach(self, loader: Any, dist: Any = None) -> None:
        """The training loader, before the first batch (e.g. to build an output cache)."""

    def dry_attach(self, loader: Any) -> None:
        """``attach`` for a dry run: check, build nothing costly (default: ``attach``)."""
        self.attach(loader)

    def setup(self, batch: Batch) -> None:
        """After the task's dry run on ``batch``."""

    def wrap(self, stream: Iterator[Batch]) -> Iterator[Batch]:
        """The epoch's batches (a teacher may look ahead at them)."""
        return stream

    def after_step(self) -> None:
        """After every optimizer step of the student."""

    def to(self, device: torch.device) -> Teacher:
        """Move whatever the teacher runs to ``device``."""
        return self

    def channels_last(self) -> None:
        """Use the ``channels_last`` memory format for what the teacher runs."""

    def compile(self) -> None:
        """``torch.compile`` what the teacher runs (``train.compile``)."""

    def fingerprint(self) -> str | None:
        """Hash of fixed weights this teacher teaches from (a resume must see the same), or None."""
        return None

    def state(self) -> dict[str, nn.Module]:
        """Modules this teacher owns that are checkpointed with the task (e.g. an EMA copy)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Facts for the report (e.g. an output cache's size)."""
        return {}


def combined_fingerprint(hashes: list[str]) -> str | None:
    """One hash over several teachers' hashes, in order (None for none, the hash itself for one)."""
    if not hashes:
        return None
    if len(hashes) == 1:
        return hashes[0]
    return hashlib.sha256("|".join(hashes).encode()).hexdigest()[:16]


def detached(out: Outputs, logits: bool, taps: tuple[str, ...]) -> Outputs:
    """``out`` cut from the graph: a constant teacher for the objective (only what is read)."""
    return Outputs(
        logits=out.logits.detach() if logits and out.logits is not None else None,
        features={p: _detach(out.feature(p)) for p in taps},
    )


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, list):  # a module run several times (on_repeat="list")
        return [_detach(v) for v in value]
    return value
