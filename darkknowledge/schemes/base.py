"""The ``Scheme`` interface: a scheme owns the topology (who teaches whom).

The engine is the same for every scheme. A scheme provides:

* ``module``: one ``nn.Module`` holding everything trainable (students, peers, adapters,
  heads). The optimizer, DDP and checkpoints see exactly this module. Its ``forward(batch,
  teacher_out, epoch_progress)`` returns ``(loss, {term: value})`` so that, under DDP, every
  trainable parameter is used inside the wrapped forward.
* ``setup(batch, info)``: a dry run on one batch before the optimizer exists (shapes,
  adapters, early errors such as a class-count mismatch).
* ``prepare(loader)``: optional pre-training stages of the losses (not run on resume).
* ``teacher_outputs(batch)``: the frozen side of a step (``None`` when nothing needs it).
* ``eval_models()``: the models whose accuracy is reported; ``primary`` names the headline.
* ``teacher_hash()``: identity of the frozen teachers, stored in checkpoints so a resume
  with a different teacher is refused.

A scheme needing two optimizers (adversarial, data-free) overrides ``training_step`` only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.losses.base import SetupInfo
from darkknowledge.registry import Registry

SCHEMES: Registry[type[Scheme]] = Registry("scheme")


class Scheme:
    """Base class of distillation schemes (see module docstring)."""

    citation: ClassVar[str] = ""
    primary: str = "student"

    @property
    def module(self) -> nn.Module:
        """Everything trainable, in one module."""
        raise NotImplementedError

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """Dry run on one batch: probe shapes, build adapters, fail early on misfits."""

    def prepare(self, loader: Iterable[Batch]) -> None:
        """Pre-training stages before the first epoch (skipped when resuming)."""

    def to(self, device: torch.device) -> Scheme:
        """Move the trainable module and any frozen parts to ``device``."""
        self.module.to(device)
        return self

    def teacher_outputs(self, batch: Batch) -> Any:
        """Frozen teachers' outputs for this batch, or None."""
        return None

    def training_step(self, model: nn.Module, batch: Batch, epoch_progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one step. ``model`` is ``module``, possibly DDP-wrapped."""
        return model(batch, self.teacher_outputs(batch), epoch_progress)

    def eval_models(self) -> dict[str, nn.Module]:
        """Models to evaluate each epoch, by name; must contain ``primary``."""
        raise NotImplementedError

    def teacher_hash(self) -> str | None:
        """Hash of the frozen teachers' weights (None when there is none)."""
        return None

    def describe(self) -> dict[str, Any]:
        """Facts for reports: extra trainable params beyond the evaluated models, etc."""
        return {}
