"""The ``DistillLoss`` interface: a loss states what it needs; the engine provides exactly that.

Life of a loss inside a run:

1. ``bind(student, teacher)`` — resolve which module paths to tap (explicit paths, or the
   models' default ``feature_taps()``) and return :class:`Needs`. Nothing runs yet. ``teacher``
   is the module whose paths the teacher taps name, or None when the teacher has no features
   (a mixture of soft labels, a virtual teacher); whether a teacher exists at all is checked
   by whoever feeds the loss (``darkknowledge.teachers.flow.Link``).
2. ``setup(student_out, teacher_out, info)`` — called once with the outputs of a dry run on
   one batch (and facts about the data, :class:`SetupInfo`), so the loss can read shapes and
   build adapters (its own ``nn.Module`` children). Adapters live inside the trainable
   module: trained with the student, never with the teacher.
3. ``pretrain(teacher_batches)`` — optional, once before training (not on resume): losses
   whose paper trains a module on the teacher's features first (e.g. FT's paraphraser).
4. ``forward(student_out, teacher_out, batch)`` — a scalar, every step.
5. ``adversary()`` — optional, after ``setup``: a trainable module the loss brings with its own
   optimizer and objective (a discriminator, :class:`Adversary`). The engine trains it as a part
   of its own (its optimizer, its step ratio) on the outputs of the step that just ran,
   detached; the loss's ``forward`` is the student's side of the game.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from darkknowledge.config import OptimizerConfig
from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.lm.targets import LazyLogits, SparseTargets
from darkknowledge.search_space import Range

KNOWLEDGE_TYPES = ("label", "response", "feature", "relation")


@dataclass(frozen=True)
class Needs:
    """What a loss reads from a step. The engine takes the union over all terms.

    Attributes:
        teacher: Needs teacher outputs at all (False: the teacher forward is skipped).
        teacher_logits: Needs the teacher's logits.
        labels: Needs ground-truth labels (a user's loop must pass them; a run's training data
            must hold some).
        indices: Needs dataset indices of the samples (memory banks; a user's loop must pass them).
        student_taps: Student module paths whose features are read.
        teacher_taps: Teacher module paths whose features are read.
    """

    teacher: bool = False
    teacher_logits: bool = False
    labels: bool = False
    indices: bool = False
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            teacher=self.teacher or other.teacher,
            teacher_logits=self.teacher_logits or other.teacher_logits,
            labels=self.labels or other.labels,
            indices=self.indices or other.indices,
            student_taps=tuple(dict.fromkeys(self.student_taps + other.student_taps)),
            teacher_taps=tuple(dict.fromkeys(self.teacher_taps + other.teacher_taps)),
        )


@dataclass(frozen=True)
class SetupInfo:
    """Facts about the training data a loss may need when it builds itself.

    Attributes:
        num_samples: Samples in the training set (labelled + transfer); indices are below it.
        num_classes: Classes (the width of the student's logits).
        batch_size: This process's batch size.
        epochs: Training epochs of the stage.
    """

    num_samples: int = 0
    num_classes: int = 0
    batch_size: int = 0
    epochs: int = 1


@dataclass
class Outputs:
    """A model's outputs for one batch: logits ``(B, K)`` and tapped features by path.

    A causal LM's per-token distribution may come without materialised ``(B, L, V)`` logits, as
    ``tokens``: hidden states and the output head (:class:`~darkknowledge.lm.targets.LazyLogits`)
    or a teacher's sparse targets read from a cache
    (:class:`~darkknowledge.lm.targets.SparseTargets`); ``logits`` is then None.
    """

    logits: torch.Tensor | None
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: LazyLogits | SparseTargets | None = None

    def feature(self, path: str) -> torch.Tensor:
        """The feature captured at ``path`` (KeyError names the captured ones)."""
        try:
            return self.features[path]
        except KeyError:
            raise KeyError(f"feature {path!r} was not captured; captured: {sorted(self.features)}") from None


@dataclass(frozen=True)
class Adversary:
    """A trainable module a loss brings, trained by its own optimizer against the student.

    Attributes:
        module: The adversary (a discriminator); a child module of the loss.
        loss: Its objective, minimised by its optimizer: ``loss(student, teacher, batch)`` on
            the outputs of the step that just ran (detached from the student's graph).
        optimizer: Its optimizer settings (None: the stage's ``train.optimizer``).
        every: It steps on every ``every``-th batch (1: each batch), after the student's step.
    """

    module: nn.Module
    loss: Callable[[Outputs, Outputs | None, Batch], torch.Tensor]
    optimizer: OptimizerConfig | None = None
    every: int = 1


def logits_of(output: Any) -> torch.Tensor:
    """A model's logits: the output itself, its ``logits`` (Hugging Face outputs), or its first item."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ShapeError(
        f"cannot find logits in a model output of type {type(output).__name__}; return a tensor "
        "(B, K), an object with .logits, or a tuple whose first item is the logits"
    )


def run_model(model: nn.Module, x: Any) -> torch.Tensor:
    """``model(x)``'s logits; a mapping ``x`` (e.g. a tokenizer's output) is passed as keyword arguments."""
    return logits_of(model(**x) if isinstance(x, Mapping) else model(x))


class DistillLoss(nn.Module):
    """Base class of every registered loss term.

    Subclasses set the class attributes, implement :meth:`forward`, and override
    :meth:`bind`/:meth:`setup` when they read features or own adapters.

    Attributes:
        knowledge: One of ``label``, ``response``, ``feature``, ``relation``.
        citation: The paper (authors, title, venue year) the loss implements.
        needs_spec: Static needs; :meth:`bind` may refine them (e.g. with tap paths).
        T: The loss's temperature, when it has one. Every loss calls its temperature ``T``
            (the paper's ``tau`` or ``lambda`` included), so a scheme that must know it (e.g.
            to mix teachers' soft labels at the loss's temperature) reads it here.
        renamed: Former parameter names -> current ones (a recipe using an old name gets an
            error that names the new one).
        search_space: What a tuner (``darkknowledge.bench.tune``) may try: ``{key: Range}``
            where a key is an ``__init__`` parameter or ``weight`` (the term's weight in the
            objective), with ranges from the paper's reported settings. Empty: nothing to tune.
    """

    knowledge: ClassVar[str] = "response"
    citation: ClassVar[str] = ""
    needs_spec: ClassVar[Needs] = Needs()
    renamed: ClassVar[dict[str, str]] = {}
    search_space: ClassVar[dict[str, Range]] = {}
    registry_name: ClassVar[str]  # set by ``register_loss``
    T: float | None = None

    @classmethod
    def reads_teacher(cls) -> bool:
        """Whether the loss reads teacher outputs (known before binding)."""
        return cls.needs_spec.teacher

    @classmethod
    def has_pretrain(cls) -> bool:
        """Whether the loss trains something on fixed teacher outputs before training."""
        return cls.pretrain is not DistillLoss.pretrain

    def softening_temperature(self) -> float | None:
        """The temperature at which the loss softens the teacher's logits (None: it reads none)."""
        return float(self.T) if self.T is not None and self.needs_spec.teacher_logits else None

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> Needs:
        """Resolve tap paths against the models and return this loss's needs."""
        return self.needs_spec

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        """Read shapes from a dry run and build adapters. Default: nothing to build."""

    def pretrain(self, teacher_batches: Callable[[], Iterator[Outputs]]) -> None:
        """Optional stage before training, on teacher outputs only. Default: nothing.

        Args:
            teacher_batches: Call it to iterate once over the training set's teacher outputs.
        """

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        """Return a scalar loss for one batch."""
        raise NotImplementedError

    def adversary(self) -> Adversary | None:
        """The module this loss trains against the student with its own optimizer (after
        ``setup``), or None (the default: the loss has no adversary)."""
        return None


def teacher_outputs(teacher: Outputs | None, loss_name: str) -> Outputs:
    """``teacher``, for a loss that reads the teacher's outputs (``Link.bind`` makes sure one feeds it).

    Raises:
        ConfigError: No teacher fed the loss.
    """
    if teacher is None:
        raise ConfigError(f"loss {loss_name!r} reads the teacher's outputs, but no teacher feeds it")
    return teacher


def class_logits(out: Outputs, reader: str) -> torch.Tensor:
    """``out.logits``, for a reader of logits ``(B, K)`` (named in the error, e.g. ``loss 'kd'``).

    Raises:
        ShapeError: The outputs have none (a language model's per-token outputs: the token losses read them).
    """
    if out.logits is None:
        raise ShapeError(
            f"{reader} reads logits (B, K), but these outputs have none (a language model's "
            "per-token outputs are read by the token losses)"
        )
    return out.logits


def logits_pair(student: Outputs, teacher: Outputs | None, loss_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's logits, for a response loss.

    Raises:
        ConfigError: No teacher fed the loss.
        ShapeError: Either outputs have no logits.
    """
    reader = f"loss {loss_name!r}"
    return class_logits(student, reader), class_logits(teacher_outputs(teacher, loss_name), reader)


def check_logits_match(student: Outputs, teacher: Outputs | None, loss_name: str) -> None:
    """Raise ``ShapeError`` when teacher and student logits differ in shape (class count)."""
    if teacher is None or teacher.logits is None or student.logits is None:
        return
    s, t = tuple(student.logits.shape), tuple(teacher.logits.shape)
    if s != t:
        raise ShapeError(
            f"loss {loss_name!r}: student logits {s} and teacher logits {t} differ. "
            "Teacher and student must predict the same classes: check model params num_classes."
        )
