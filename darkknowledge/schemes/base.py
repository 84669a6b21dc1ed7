"""The ``Scheme`` interface: a scheme is a plan of who teaches whom, in which stages.

A scheme says which trainable models exist, which teacher (a
:class:`~darkknowledge.teachers.base.Teacher`: a frozen model, a mixture, an EMA, a peer, ...)
feeds which student through which objective (the recipe's ``losses``), and how stages follow
one another. It computes no loss itself: losses own the math, teachers provide outputs, and
the engine trains the :class:`~darkknowledge.engine.task.Task` a plan makes.

* ``task(ctx, seed, params)`` makes the one stage of a single-stage scheme (usually a
  :class:`~darkknowledge.schemes.task.FlowTask` over a :class:`~darkknowledge.teachers.flow.Flow`);
* ``run(ctx, seed, params)`` trains the scheme for one seed and returns the results entries;
  multi-stage schemes (generations, assistant chains, pipelines) override it and call
  ``ctx.train`` once per stage, each stage resumable on its own.

Parameters are typed once: each scheme declares ``Params``, a pydantic model (every scheme's
params include ``transfer``), validated by :func:`resolve_scheme` before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from darkknowledge.errors import ConfigError, did_you_mean
from darkknowledge.registry import Registry
from darkknowledge.validation import format_validation_error

if TYPE_CHECKING:
    from darkknowledge.engine.task import Task
    from darkknowledge.schemes.context import Context

SCHEMES: Registry[type[Scheme]] = Registry("scheme")


class SchemeParams(BaseModel):
    """``scheme.params`` common to every scheme; each scheme's ``Params`` extends it."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    transfer: StrictBool | None = Field(
        default=None, description="the students also read the unlabeled transfer set (default: the scheme's own choice)"
    )


MOVED_TO_LOSSES = {
    "T": "the temperature is the loss's: losses.<term>.T (e.g. losses: {kd: {T: 3, alpha: 1}})",
    "weight": "a term's weight is the loss's: losses.<term>.weight",
    "burn_in": "a burn-in is the term's schedule: losses.<term>.start_epoch",
    "rampup": "a ramp-up is the term's schedule: losses.<term>.warmup_epochs (with warmup_shape: sigmoid)",
    "alpha": "the weights of the terms are the losses': losses.<term>.weight",
}
"""Scheme parameters that became loss parameters; a recipe that still sets them is told where."""


def resolve_scheme(name: str, params: dict[str, Any]) -> tuple[type[Scheme], SchemeParams]:
    """The scheme class and its validated params.

    Raises:
        RegistryError: Unknown scheme (with close names).
        ConfigError: A bad key or value, naming ``scheme.params.<key>`` and what is valid.
    """
    cls = SCHEMES.get(name)
    fields = cls.Params.model_fields
    for key in params:
        if key in fields:
            continue
        if key in cls.moved:
            raise ConfigError(f"scheme.params.{key}: not a parameter of scheme {name!r} any more; {cls.moved[key]}")
        raise ConfigError(
            f"scheme.params.{key}: unknown parameter {key!r}.{did_you_mean(key, fields)} "
            f"Valid parameters: {', '.join(fields)}."
        )
    try:
        return cls, cls.Params(**params)
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "scheme.params")) from None


class Scheme:
    """Base class of distillation schemes (see module docstring)."""

    registry_name: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    """Paper(s), shown by ``dk list schemes``."""
    summary: ClassVar[str] = ""
    """One line: how knowledge flows."""
    report_notes: ClassVar[tuple[str, ...]] = ()
    default_transfer: ClassVar[bool] = False
    """Whether the scheme's students also read the unlabeled transfer set unless the recipe
    says otherwise (``scheme.params.transfer``)."""
    pretrained_teacher: ClassVar[bool] = False
    """Whether the scheme is taught by the recipe's pre-trained ``teacher:`` (offline, assistants,
    residual, QKD, data-free): ``dk run`` then trains or loads it before the baselines, whose
    fidelity to it is the students' reference. A scheme that only borrows the teacher's
    architecture (``codistill``) leaves it False."""
    Params: ClassVar[type[SchemeParams]] = SchemeParams
    moved: ClassVar[dict[str, str]] = {}
    """Former parameters of this scheme and where they went (for a clear error)."""
    example: ClassVar[dict[str, Any]] = {}
    """Recipe keys, merged over a small MNIST-1D recipe (a ``cnn1d`` teacher, an ``mlp`` student,
    ``losses: {ce: {}, kd: {T: 4, alpha: 1}}``), with which the scheme trains: the contract tests
    run every registered scheme with it (``scheme.params`` go under ``scheme: {params: ...}``)."""

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> Task:
        """The one stage of a single-stage scheme for ``seed``."""
        raise NotImplementedError(f"scheme {cls.__name__} implements neither task() nor run()")

    @classmethod
    def label(cls, ctx: Context, params: Any) -> str:
        """The report's method column of the scheme's student."""
        return cls.registry_name

    @classmethod
    def run(cls, ctx: Context, seed: int, params: Any) -> list[dict[str, Any]]:
        """Train the scheme for one seed; returns the results entries (primary first)."""
        task = cls.task(ctx, seed, params)
        return ctx.train(
            ctx.stage_name(seed), task, seed, with_transfer=ctx.uses_transfer(cls), label=cls.label(ctx, params)
        )

    @classmethod
    def check(cls, ctx: Context, seed: int, params: Any) -> None:
        """Fail when the scheme cannot be built from this recipe (builds and discards the stage
        of a single-stage scheme; ``ctx.teacher()`` may train a teacher).

        The commands do more, before anything trains: their preflight
        (:mod:`darkknowledge.runs.preflight`) plays ``run`` with a context whose stages are dry
        runs on one batch.
        """
        if cls.run.__func__ is Scheme.run.__func__:  # type: ignore[attr-defined]  # a classmethod's function
            cls.task(ctx, seed, params).release()


SchemeT = TypeVar("SchemeT", bound="Scheme")


def register_scheme(name: str) -> Callable[[type[SchemeT]], type[SchemeT]]:
    """Register a :class:`Scheme` subclass under ``name``."""

    def decorator(cls: type[SchemeT]) -> type[SchemeT]:
        cls.registry_name = name
        SCHEMES.register(name)(cls)
        return cls

    return decorator
