"""A pipeline of stages in one recipe, e.g. train teacher -> train assistant -> distill student.

Not a paper's method but the survey's multi-stage view of offline distillation (Gou et al.,
"Knowledge Distillation: A Survey", IJCV 2021: offline distillation "requires two phases and
one-way knowledge transfer", and assistants close the teacher-student capacity gap): each
stage trains one model, with cross-entropy alone or with distillation losses from an earlier
stage (or the recipe's pre-trained teacher); the per-stage objective is any weighted sum of
registered losses, e.g. Hinton et al.'s KD ``alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE``.

Every stage is one resumable stage of the run: ``dk run pipeline --resume`` after a kill
skips the finished stages (reloading their models) and continues the interrupted one at the
epoch where its ``last.pt`` left it. The last stage is the primary (role ``student``); the
others are report rows named after their stages. Stages are trained per seed.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from darkknowledge.config import ModelConfig
from darkknowledge.errors import ConfigError
from darkknowledge.schemes.base import Scheme, SchemeParams, register_scheme
from darkknowledge.schemes.chain import Stage, run_chain

if TYPE_CHECKING:
    from torch import nn

    from darkknowledge.schemes.context import Context

RESERVED = ("teacher", "student", "baseline")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class PipelineStage(BaseModel):
    """One stage of a pipeline (an item of ``scheme.params.stages``).

    Attributes:
        name: Stage name (letters, digits, ``_``; unique; not teacher/student/baseline).
        model: A zoo model spec, or ``"student"`` for the recipe's student (the baseline's init).
        teacher: An earlier stage's name, ``"teacher"`` (the recipe's pre-trained teacher) or None.
        losses: The stage's losses (like the recipe's ``losses``); None = cross-entropy alone.
        train: Overrides of the recipe's ``train`` for this stage.
        with_transfer: Also train on the unlabeled transfer set (default: when it has a teacher).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    model: ModelConfig | Literal["student"] = "student"
    teacher: str | None = None
    losses: dict[str, dict[str, Any] | None] | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    with_transfer: bool | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME.fullmatch(v) or v in RESERVED:
            raise ValueError(
                f"stage name {v!r} must be letters, digits and '_' (starting with a letter) "
                f"and not one of {', '.join(RESERVED)}"
            )
        return v


def check_stages(stages: list[PipelineStage], has_teacher: bool) -> None:
    """Validate names and teacher references before anything is built or trained.

    Args:
        stages: The pipeline, in training order.
        has_teacher: Whether the recipe has a ``teacher:`` section (``teacher: teacher`` needs it).

    Raises:
        ConfigError: No stage, a duplicate name, or a teacher that is not an earlier stage.
    """
    if not stages:
        raise ConfigError("scheme.params.stages: a pipeline needs at least one stage")
    seen: list[str] = []
    for i, stage in enumerate(stages):
        where = f"scheme.params.stages.{i}"
        if stage.name in seen:
            raise ConfigError(f"{where}.name: duplicate stage name {stage.name!r}; names so far: {', '.join(seen)}")
        valid = [*seen, "teacher"] if has_teacher else list(seen)
        if stage.teacher is not None and stage.teacher not in valid:
            later = [s.name for s in stages[i:]]
            why = (
                " (a stage can only be taught by an earlier one)"
                if stage.teacher in later
                else " (the recipe has no `teacher:` section)"
                if stage.teacher == "teacher"
                else ""
            )
            raise ConfigError(
                f"{where}.teacher: unknown teacher {stage.teacher!r}{why}; valid: "
                f"{', '.join(repr(v) for v in valid) or 'none (first stage: use null)'}, or null"
            )
        seen.append(stage.name)


class PipelineParams(SchemeParams):
    """``scheme.params`` of ``pipeline``."""

    stages: list[PipelineStage] = Field(description="the stages, in training order; the last is the student")


@register_scheme("pipeline")
class Pipeline(Scheme):
    """Explicit stages, each taught by an earlier stage (or the recipe teacher, or nobody)."""

    citation = "Gou et al., Knowledge Distillation: A Survey, IJCV 2021 (multi-stage offline distillation)."
    summary = "explicit stages in order; each stage's model learns from an earlier stage's (or alone)"
    report_notes: ClassVar[tuple[str, ...]] = (
        "pipeline: every stage is trained per seed; the last stage is the student, earlier stages are rows named "
        "after them",
    )

    example: ClassVar[dict[str, Any]] = {
        "scheme": {
            "params": {
                "stages": [
                    {
                        "name": "mid",
                        "model": {"name": "mlp", "params": {"hidden": [24]}},
                        "teacher": "teacher",
                        "losses": {"kd": {"alpha": 1.0}},
                    },
                    {"name": "last", "teacher": "mid", "losses": {"ce": {}, "kd": {"alpha": 1.0}}},
                ]
            }
        }
    }
    Params = PipelineParams

    @classmethod
    def run(cls, ctx: Context, seed: int, params: Any) -> list[dict[str, Any]]:
        """Train the stages (``params.stages``, see :class:`PipelineStage`) for ``seed`` in order;
        the last stage's entry comes first."""
        stages = params.stages
        check_stages(stages, ctx.cfg.teacher is not None)
        models: dict[str, nn.Module] = {}
        links: list[Stage] = []
        for i, stage in enumerate(stages):
            where = f"scheme.params.stages.{i}"
            last = i == len(stages) - 1
            model = (
                ctx.student(seed)
                if stage.model == "student"
                else ctx.model(stage.model, seed=seed, where=f"{where}.model")
            )
            teacher = (
                None
                if stage.teacher is None
                else ctx.teacher()
                if stage.teacher == "teacher"
                else models[stage.teacher]
            )
            transfer = stage.with_transfer if stage.with_transfer is not None else teacher is not None
            links.append(
                Stage(
                    part=None if last else stage.name,
                    model=model,
                    teacher=teacher,
                    losses=stage.losses,
                    role="student" if last else stage.name,
                    train_cfg=ctx.train_cfg(stage.train, f"{where}.train") if stage.train else None,
                    with_transfer=transfer,
                    label=cls.registry_name,
                    where=f"{where}.losses",
                    teacher_name=stage.teacher,
                )
            )
            models[stage.name] = model
        return run_chain(ctx, seed, links)
