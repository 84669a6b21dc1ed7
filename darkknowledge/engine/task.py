"""The task protocol: what the one training loop drives, owned by the engine.

A *task* is one stage's work: everything it trains lives in one ``module`` (students, peers,
adapters, heads, generators; also state that is checkpointed but not optimised, such as an EMA
copy), which is what DDP wraps and what ``last.pt`` holds. The trainer calls, in order:

* ``training_data(seed, device, dist)`` before anything else: None (the stage's loader over the
  training split) or the task's own batches (a data-free task's latent codes: the training
  split is then never read).
* ``attach(loader, dist)`` once per fit, resumed or not: the training data the task will see.
  A task may prepare from it what depends on the data (a teacher-output cache and the views
  the loader replays, a sampler of same-class partners, a synthesiser's sample pool).
* ``setup(batch, info)``: a dry run on one batch (probe shapes, build adapters, fail early).
* ``prepare(loader)``: pre-training stages (e.g. FT's paraphraser); skipped on resume, since
  their result is in the checkpoint.
* ``batches(stream)``: the epoch's batches as the steps will see them (identity by default; a
  task may look ahead, e.g. to run a frozen teacher on several batches at once, or replace
  real batches by synthetic ones).
* per batch and per trainable ``Part`` due at that batch: ``training_step(model, batch,
  epoch_progress, part)`` returns ``(loss, {term: value})``; the engine does autocast,
  backward, clipping, the part's optimizer and LR schedule, then ``after_step(part)``.
* ``saved(step)`` after each ``last.pt`` is written (state that lives outside the checkpoint,
  such as a sample pool on disk, may drop what no resume can need any more).
* ``eval_models()`` after each epoch; ``export_model()`` at the end.

Several trainable parts (``parts()``) each get their own optimizer, LR schedule and step ratio
(``Part.every``): e.g. a discriminator stepped before each student step, or one generator step
per five student steps. They are checkpointed and resumed together. With one part (the
default) the loop is the plain one: gradient accumulation and DDP's ``no_sync`` apply.

``fingerprint()`` names what the task learns from that must not change under a resume (the
frozen teachers' weights): a checkpoint made with another fingerprint is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from darkknowledge.config import OptimizerConfig, SchedulerConfig
from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import SetupInfo

MAIN = "main"
"""Name of the one part of a single-optimizer task."""


@dataclass(frozen=True)
class Part:
    """A trainable part of a task with its own optimizer.

    Attributes:
        name: Part name: checkpoint keys, metrics prefix (``train/<name>/<term>`` when a task has
            several parts) and the ``part`` argument of ``Task.training_step``.
        module: The module whose trainable parameters this part's optimizer updates (a submodule
            of the task's ``module``; parts must not share parameters).
        optimizer: Its optimizer settings (None: the stage's ``train.optimizer``).
        scheduler: Its LR schedule (None: the stage's ``train.scheduler``).
        every: The part takes a step on every ``every``-th batch (1: each batch). Within a batch
            the parts step in the order ``parts()`` lists them.
        exclude: Submodules of ``module`` whose parameters belong to other parts (e.g. a
            discriminator inside the flow it judges): this part's optimizer leaves them alone.
    """

    name: str
    module: nn.Module
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    every: int = 1
    exclude: tuple[nn.Module, ...] = ()

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"part {self.name!r}: every must be >= 1 (got {self.every})")

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters this part's optimizer updates (``module``'s, less ``exclude``'s)."""
        excluded = {id(p) for m in self.exclude for p in m.parameters()}
        return [p for p in self.module.parameters() if p.requires_grad and id(p) not in excluded]

    def due(self, batch_number: int) -> bool:
        """Whether this part steps at the ``batch_number``-th batch of the stage (0-based)."""
        return batch_number % self.every == 0


class Task:
    """Base class of a stage's task (see the module docstring); override what applies."""

    primary: str = "student"
    """Name (in ``eval_models()``) of the model whose accuracy selects the best epoch."""

    @property
    def module(self) -> nn.Module:
        """Everything trainable (and checkpointed), in one module."""
        raise NotImplementedError

    def parts(self) -> list[Part]:
        """The trainable parts; default: one part over the whole ``module``."""
        return [Part(MAIN, self.module)]

    def training_data(self, seed: int, device: torch.device, dist: Any = None) -> Any:
        """The task's own training loader (``set_epoch``, ``iter_from``, ``len``, ``data``), or None
        for the stage's loader over the training split (the default)."""
        return None

    def attach(self, loader: Any, dist: Any = None) -> None:
        """The training loader (and distributed context), at the start of every fit."""

    def dry_attach(self, loader: Any, dist: Any = None) -> None:
        """``attach`` for a dry run (a preflight that takes no step): check what ``attach`` would
        check, without building what only training needs (e.g. a teacher-output cache);
        default: ``attach``."""
        self.attach(loader, dist)

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """Dry run on one batch: probe shapes, build adapters, fail early on misfits."""

    def prepare(self, loader: Iterable[Batch]) -> None:
        """Pre-training stages before the first epoch (skipped when resuming)."""

    def batches(self, stream: Iterator[Batch]) -> Iterator[Batch]:
        """The epoch's training batches as the steps see them (default: ``stream``)."""
        return stream

    def training_step(
        self, model: nn.Module, batch: Batch, epoch_progress: float, part: str = MAIN
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one step of ``part``. ``model`` is ``module``, possibly DDP-wrapped: call it
        (its ``forward``) so that DDP sees every parameter the loss uses."""
        return model(batch, epoch_progress)

    def after_step(self, part: str = MAIN) -> None:
        """Called after every optimizer step of ``part`` (e.g. to update an EMA teacher)."""

    def saved(self, step: int) -> None:
        """Called after ``last.pt`` was written at ``step`` (a resume starts from there at the earliest)."""

    def eval_models(self) -> dict[str, nn.Module]:
        """Models evaluated each epoch, by name; must contain ``primary``."""
        raise NotImplementedError

    def export_model(self) -> nn.Module:
        """The deployable model written to ``model.pt`` (default: the primary evaluated model)."""
        return self.eval_models()[self.primary]

    def fingerprint(self) -> str | None:
        """Hash of what must not change under a resume (frozen teachers' weights), or None."""
        return None

    def to(self, device: torch.device) -> Task:
        """Move the module and anything else the task runs (frozen teachers) to ``device``."""
        self.module.to(device)
        return self

    def channels_last(self) -> None:
        """Use the ``channels_last`` memory format (``train.channels_last``)."""
        self.module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from the stubs

    def compile(self) -> None:
        """``torch.compile`` the evaluated models in place (``train.compile``)."""
        for model in {id(m): m for m in self.eval_models().values()}.values():
            model.compile()

    def release(self) -> None:
        """Free what the task attached to its models (hooks) when it will not be trained."""

    def describe(self) -> dict[str, Any]:
        """Facts for reports: ``losses`` (term names), ``adapter_params`` (trainable parameters
        beyond the exported model), and e.g. ``cache``."""
        return {}
