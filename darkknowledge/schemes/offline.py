"""Offline distillation: a frozen, pre-trained teacher teaches a student.

Hinton et al. 2015 and the survey's "offline" scheme (Gou et al., IJCV 2021, Sec. 4.1): the
teacher is trained first, then frozen; knowledge flows one way. With no teacher and a
``ce``-only objective the same plan trains a model alone (the baseline).

Plan: one view, the student; one link, the frozen teacher (live, run ahead or cached, see
:class:`~darkknowledge.teachers.frozen.Frozen`) teaching it the recipe's ``losses``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, StrictBool
from torch import nn

from darkknowledge.losses.objective import Objective
from darkknowledge.schemes.base import Scheme, SchemeParams, register_scheme
from darkknowledge.schemes.keep_better import ALONE, require_validation, selection
from darkknowledge.schemes.task import FlowTask
from darkknowledge.teachers.flow import Flow, Link
from darkknowledge.teachers.frozen import Frozen

if TYPE_CHECKING:
    from darkknowledge.config import CacheConfig
    from darkknowledge.schemes.context import Context


def offline_task(
    student: nn.Module,
    objective: Objective,
    teacher: nn.Module | Frozen | None = None,
    cache: CacheConfig | None = None,
    teacher_name: str = "teacher",
    where: str = "losses",
) -> FlowTask:
    """``teacher`` (frozen) teaches ``student`` through ``objective``; no teacher: ``student`` alone.

    A teacher that no term reads is not run at all.

    Args:
        student: The model to train (in place).
        objective: The weighted loss terms.
        teacher: A trained model (or a :class:`Frozen` teacher), or None.
        cache: The teacher-output cache settings (``cache.enabled``: computed once, read by index).
        teacher_name: The teacher's name in messages (``teacher``, ``gen1``, ...).
        where: Config path of the objective, for messages.

    Raises:
        ConfigError: A term needs a teacher and there is none, or reads what it does not give.
    """
    frozen = teacher if isinstance(teacher, Frozen) or teacher is None else Frozen(teacher, teacher_name, cache)
    if frozen is not None and not objective.teacher_terms():
        frozen = None  # nothing reads it: no teacher forward
    flow = Flow({"student": student}, [Link("student", objective, frozen, where=where)])
    return FlowTask(flow, {"student": flow.view_model("student")})


class OfflineParams(SchemeParams):
    """``scheme.params`` of the offline scheme."""

    keep_better: StrictBool = Field(
        default=False,
        description="also train the student alone (same init, budget) and deliver the better on the validation split",
    )


@register_scheme("offline")
class Offline(Scheme):
    """Frozen teacher -> student with any objective of registered losses.

    With ``keep_better`` the plan has two stages: the student alone (cross-entropy, stage
    ``<losses>-alone-s<seed>``, from the same initialisation) and the distilled student; the one
    better on the validation split is delivered (:mod:`darkknowledge.schemes.keep_better`).
    """

    Params = OfflineParams
    pretrained_teacher = True

    default_transfer = True
    citation = "Hinton et al. 2015; Gou et al., Knowledge Distillation: A Survey, IJCV 2021 (offline distillation)."
    summary = "a frozen, pre-trained teacher teaches the student (one way)"

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> FlowTask:
        """The recipe's student (seed's init), objective and pre-trained teacher (cached if asked)."""
        objective = ctx.objective()
        teacher = ctx.frozen(ctx.teacher(), "teacher") if ctx.cfg.teacher is not None else None
        return offline_task(ctx.student(seed), objective, teacher)

    @classmethod
    def run(cls, ctx: Context, seed: int, params: Any) -> list[dict[str, Any]]:
        """Train the distilled student; with ``keep_better`` the student alone first, then the better
        of the two on the validation split comes first in the entries (both record the choice)."""
        if not params.keep_better:
            return super().run(ctx, seed, params)
        require_validation(ctx.has_validation)
        alone = ctx.train_alone(ctx.stage_name(seed, ALONE), ctx.student(seed), seed, role=ALONE)
        distilled = super().run(ctx, seed, params)
        choice = selection(alone, distilled[0])
        for entry in (alone, distilled[0]):
            entry["selection"] = choice
            ctx.record(entry)
        if choice["kept"] == ALONE:
            return [alone, *distilled]
        return [distilled[0], alone, *distilled[1:]]

    @classmethod
    def check(cls, ctx: Context, seed: int, params: Any) -> None:
        """Build and discard the distilled stage (and fail early when ``keep_better`` has no validation split)."""
        if params.keep_better:
            require_validation(ctx.has_validation)
        cls.task(ctx, seed, params).release()

    @classmethod
    def label(cls, ctx: Context, params: Any) -> str:
        return "+".join(ctx.cfg.losses)
