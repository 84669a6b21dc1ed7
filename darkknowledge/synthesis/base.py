"""The ``Synthesizer`` interface: input batches for distillation made from a teacher, without real data.

A synthesiser turns *latent batches* (:func:`draw_latent`: Gaussian codes ``z`` and target classes,
drawn from the run's seed and the step, so a resumed run draws the same) into inputs the student
trains on. It may train modules of its own (a generator) as parts of the task, each with its own
optimizer and step ratio (:class:`~darkknowledge.engine.task.Part`), and may keep what it made in
a :class:`~darkknowledge.synthesis.pool.SamplePool` on disk.

Life of a synthesiser inside a data-free task (:mod:`darkknowledge.schemes.data_free`):

1. ``__init__(params, teacher, input_shape, num_classes)``: build generators from the shapes. The
   teacher is the frozen, pre-trained model (``eval()``, no parameter gradients); a synthesiser
   runs it itself, with gradients to its inputs.
2. ``parts()``: its trainable parts (none for inputs optimised directly, or random noise).
3. per batch, for each of its parts due: ``part_loss(part, latent, student)``; then the student's
   step reads ``sample(latent, student)``: the inputs ``(B, *input_shape)``, no gradient, in the
   models' input space (normalised like the training data would be).
4. ``saved()`` after each checkpoint; ``use_directory(path)`` once, before training (a pool's home).
5. ``preview(n)`` for the report: samples of the trained synthesiser.

The student's objective is the recipe's ``losses`` (losses own the math); a synthesiser's own
objective (the generator's) lives in its file, as a pure function with the paper's equation.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pydantic
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.data.seeds import make_generator
from darkknowledge.engine.task import Part
from darkknowledge.errors import ConfigError, did_you_mean
from darkknowledge.registry import Registry
from darkknowledge.validation import format_validation_error

SYNTHESIZERS: Registry[type[Synthesizer]] = Registry("synthesizer")

LATENT_STREAM = 7_919
"""Stream id of the latent draws (``darkknowledge.data.seeds.make_generator``)."""

PREVIEW_KEY = 2**31 - 1
"""The epoch key of the report's preview draws (no training epoch has it)."""


class SynthesizerParams(BaseModel):
    """Parameters common to every synthesiser; each one's ``Params`` extends it."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def draw_latent(
    seed: int,
    key: tuple[int, int],
    batch_size: int,
    latent_dim: int,
    num_classes: int,
    device: torch.device | str = "cpu",
) -> Batch:
    """One latent batch: ``x`` codes ``z ~ N(0, I)`` ``(B, latent_dim)``, ``y`` target classes ``(B,)``
    drawn uniformly (class-conditional synthesis reads them; the student never gets them as labels).

    Args:
        seed: The run's seed.
        key: ``(epoch, batch)``: the same key draws the same batch (a resumed run draws the same).
        batch_size: ``B``.
        latent_dim: Width of ``z`` (0: an empty code).
        num_classes: Classes of the targets.
        device: Where the batch lives.
    """
    g = make_generator(seed, LATENT_STREAM, *key)
    z = torch.randn(batch_size, latent_dim, generator=g)  # (B, latent_dim)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)  # (B,)
    idx = torch.full((batch_size,), UNLABELED, dtype=torch.long)  # not samples of any dataset
    return Batch(z, y, idx).to(device)


class Synthesizer(nn.Module):
    """Base class of synthesisers (see the module docstring).

    Attributes:
        latent_dim: Width of the codes ``z`` it reads (0: none).
        teacher: The frozen teacher (not a submodule: never trained, never checkpointed here).
        input_shape: One input's shape, e.g. ``(1, 28, 28)`` or ``(1, 40)``.
        num_classes: The teacher's classes.
    """

    registry_name: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Params: ClassVar[type[SynthesizerParams]] = SynthesizerParams
    example: ClassVar[dict[str, Any]] = {}
    """Params with which it trains in a few steps (the contract tests run every synthesiser with them)."""

    latent_dim: int = 0
    teacher: nn.Module  # a plain attribute (set in __init__), not a submodule

    def __init__(
        self, params: SynthesizerParams, teacher: nn.Module, input_shape: tuple[int, ...], num_classes: int
    ) -> None:
        super().__init__()
        self.params = params
        self.__dict__["teacher"] = teacher  # a plain attribute: not a submodule
        self.input_shape = tuple(input_shape)
        self.num_classes = int(num_classes)

    def parts(self) -> list[Part]:
        """Its trainable parts (default: none)."""
        return []

    def part_loss(self, part: str, latent: Batch, student: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one step of its part ``part`` on ``latent``: ``(loss, {term: value})``."""
        raise NotImplementedError(f"synthesizer {self.registry_name!r} has no part {part!r}")

    def sample(self, latent: Batch, student: nn.Module | None) -> torch.Tensor:
        """Inputs ``(B, *input_shape)`` for the student's step on ``latent`` (no gradient); ``student``
        is None for a preview (:meth:`preview`)."""
        raise NotImplementedError

    def preview(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` samples for the report, ``(n, *input_shape)`` on the CPU (default: ``sample``)."""
        device = next((t.device for t in itertools.chain(self.parameters(), self.buffers())), torch.device("cpu"))
        latent = draw_latent(seed, (PREVIEW_KEY, 0), n, self.latent_dim, self.num_classes, device)
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.sample(latent, None).cpu()
        finally:
            self.train(was)

    def to_device_of(self, latent: Batch) -> None:
        """Keep the (non-submodule) teacher on the latent batch's device."""
        device = latent.y.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)

    def use_directory(self, path: Path | None) -> None:
        """Where it may keep what it made (a sample pool), e.g. ``<stage>/pool``; None: in memory."""

    def saved(self) -> None:
        """After each checkpoint of the task (a pool may now drop what no resume can need)."""

    def describe(self) -> dict[str, Any]:
        """Facts for the report (e.g. the generator's parameters)."""
        return {"synthesizer": self.registry_name}


def resolve_synthesizer(
    name: str, params: dict[str, Any], where: str = "scheme.params.synthesizer"
) -> tuple[type[Synthesizer], SynthesizerParams]:
    """The synthesiser class and its validated params.

    Raises:
        RegistryError: Unknown synthesiser (with close names).
        ConfigError: A bad key or value, naming ``<where>.params.<key>`` and what is valid.
    """
    cls = SYNTHESIZERS.get(name)
    fields = cls.Params.model_fields
    for key in params:
        if key not in fields:
            raise ConfigError(
                f"{where}.params.{key}: unknown parameter {key!r} of synthesizer {name!r}."
                f"{did_you_mean(key, fields)} Valid parameters: {', '.join(fields) or 'none'}."
            )
    try:
        return cls, cls.Params(**params)
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"{where}.params")) from None


SynthesizerT = TypeVar("SynthesizerT", bound="Synthesizer")


def register_synthesizer(name: str) -> Callable[[type[SynthesizerT]], type[SynthesizerT]]:
    """Register a :class:`Synthesizer` subclass under ``name``."""

    def decorator(cls: type[SynthesizerT]) -> type[SynthesizerT]:
        cls.registry_name = name
        SYNTHESIZERS.register(name)(cls)
        return cls

    return decorator
