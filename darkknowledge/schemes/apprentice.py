"""Apprentice, scheme A: a full-precision teacher and a low-precision student trained jointly.

Mishra & Marr, "Apprentice: Using Knowledge Distillation Techniques To Improve Low-Precision
Network Accuracy", ICLR 2018 (arXiv:1711.05852). Scheme A trains the full-precision teacher
``T`` and the low-precision student (the apprentice ``A``) together, from scratch, on one
joint loss::

    L(x; W_T, W_A) = alpha * H(y, p_T) + beta * H(y, p_A) + gamma * H(z_T, p_A)

with ``H`` the cross-entropy, ``p = softmax(z / tau)`` and ``alpha = 1``, ``beta = 0.5``,
``gamma = 0.5``, ``tau = 1`` (the values its hyper-parameter study settles on). The teacher's
logits are a constant target in the third term: the teacher learns from its own cross-entropy
only (``alpha H(y, p_T)``), the student from the labels and the teacher. Intel's Distiller (from
the authors' company) computes that term against ``softmax(z_T / tau).detach()``, with the same
defaults (0.5, 0.5, ``tau = 1``) and a separate teacher-vs-labels weight reserved for scheme A.
Only the abstract of the paper could be read when this was written: the loss is the issue's,
the values and the detached target are those of a published summary and of Distiller.

The other two schemes need no plan of their own:

* scheme B (a trained full-precision teacher, frozen, teaches a low-precision student from
  scratch) is offline distillation: scheme ``offline`` with a quantized ``student``;
* scheme C (fine-tune a student first trained at full precision, now at low precision, with the
  teacher) is offline distillation from a student checkpoint: scheme ``offline`` with
  ``student: {checkpoint: <full-precision student>.pt, quantize: {...}}``.

Plan: two views, ``student`` and ``teacher_peer`` (the recipe's ``teacher:`` architecture,
freshly initialised); the student learns the recipe's ``losses`` from the teacher's detached
outputs (:class:`~darkknowledge.teachers.peers.Peer`): the paper's ``beta H(y, p_A) + gamma
H(z_T, p_A)`` is ``ce: {weight: 0.5}, kd: {T: 1, alpha: 1, weight: 0.5}`` (``T^2 KL(p_T || p_A)``
differs from ``H(p_T, p_A)`` by the entropy of ``p_T``, a constant for the student, so the
gradients are the same). The teacher learns ``scheme.params.teacher_losses`` (default
``{ce: {}}``, the paper's ``alpha H(y, p_T)``), terms that read no teacher. Both sum into one
loss and one optimizer step: since each view's loss reaches the other only through detached
tensors, ``d L / d W_T = alpha * d H(y, p_T) / d W_T``. The low precision itself is the
student's model spec (``student: {quantize: ...}``); this plan treats it as any module.

Shapes: both views map inputs ``(B, ...)`` to logits ``(B, K)``; the teacher's ``(B, K)``
logits (and any tapped features) reach the student's terms detached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field
from torch import nn

from darkknowledge.config import ModelConfig, losses_default
from darkknowledge.errors import ConfigError
from darkknowledge.losses.objective import Objective
from darkknowledge.schemes.base import Scheme, SchemeParams, register_scheme
from darkknowledge.schemes.cohort import COHORT_MOVED, peer_seed
from darkknowledge.schemes.task import FlowTask
from darkknowledge.schemes.wiring import require_teacher_terms
from darkknowledge.teachers.flow import Flow, Link
from darkknowledge.teachers.peers import Peer

if TYPE_CHECKING:
    from darkknowledge.schemes.context import Context

TEACHER_VIEW = "teacher_peer"
"""The jointly trained teacher's view (and report row) name."""

TEACHER_LOSSES_WHERE = "scheme.params.teacher_losses"


class ApprenticeParams(SchemeParams):
    """``scheme.params`` of ``apprentice``."""

    teacher_losses: dict[str, dict[str, Any] | None] = Field(
        default_factory=losses_default({"ce": {}}),
        description="what the full-precision teacher learns, from the labels alone (the paper's alpha H(y, p_T): "
        "ce, weight alpha); no term may read a teacher",
    )


def teacher_objective(ctx: Context, losses: Mapping[str, Any]) -> Objective:
    """The teacher's objective: terms that read no teacher (the teacher learns from the labels).

    Raises:
        ConfigError: No term, or a term that reads a teacher.
    """
    if not losses:
        raise ConfigError(
            f"{TEACHER_LOSSES_WHERE}: the teacher needs a loss of its own, got none; "
            "use {ce: {}} (the paper's alpha H(y, p_T), alpha = 1)"
        )
    objective = ctx.objective(losses, where=TEACHER_LOSSES_WHERE)
    reading = objective.teacher_terms()
    if reading:
        raise ConfigError(
            f"{TEACHER_LOSSES_WHERE}: {reading} read a teacher, but in Apprentice's scheme A the "
            "teacher learns from the labels alone (alpha H(y, p_T)); use terms that read none, "
            "e.g. {ce: {}}"
        )
    return objective


def apprentice_task(
    student: nn.Module, teacher: nn.Module, student_objective: Objective, teacher_objective: Objective
) -> FlowTask:
    """The joint stage: ``student`` taught by ``teacher`` (detached); ``teacher`` by its own objective.

    Args:
        student: The low-precision student (trained in place; the exported model).
        teacher: The full-precision teacher (trained in place; row ``teacher_peer``).
        student_objective: What the student learns from the teacher (the recipe's ``losses``).
        teacher_objective: What the teacher learns alone (terms that read no teacher).

    Returns:
        A one-part task: one loss, one optimizer over both models.
    """
    links = [
        Link("student", student_objective, Peer(TEACHER_VIEW, teacher)),
        Link(TEACHER_VIEW, teacher_objective, None, suffix=f"@{TEACHER_VIEW}", where=TEACHER_LOSSES_WHERE),
    ]
    flow = Flow({"student": student, TEACHER_VIEW: teacher}, links)
    return FlowTask(flow, {"student": student, TEACHER_VIEW: teacher})


def teacher_architecture(ctx: Context, scheme: str) -> ModelConfig:
    """The recipe's ``teacher:`` as an architecture to train from scratch (no checkpoint, no ``train``).

    Raises:
        ConfigError: No ``teacher:`` section, or one with a ``checkpoint``.
    """
    spec = ctx.cfg.teacher
    if spec is None:
        raise ConfigError(
            f"scheme {scheme!r} needs a `teacher:` section naming the full-precision teacher's "
            "architecture (e.g. teacher: {name: cnn1d}); scheme A trains it from scratch with the "
            "student"
        )
    if spec.checkpoint:
        raise ConfigError(
            f"scheme {scheme!r} trains the teacher from scratch with the student (Apprentice's "
            f"scheme A), but teacher.checkpoint is {spec.checkpoint!r}; remove it, or use scheme "
            "'offline' for scheme B (a pre-trained, frozen teacher)"
        )
    fields = set(ModelConfig.model_fields) - {"checkpoint"}
    return ModelConfig(**spec.model_dump(include=fields))


@register_scheme("apprentice")
class Apprentice(Scheme):
    """Apprentice scheme A: a full-precision teacher and the low-precision student trained jointly."""

    citation = (
        "Mishra, Marr. Apprentice: Using Knowledge Distillation Techniques To Improve Low-Precision "
        "Network Accuracy. ICLR 2018."
    )
    summary = (
        "a full-precision teacher and the (low-precision) student trained together from scratch; the student "
        "learns the losses from the teacher's detached outputs, the teacher from the labels"
    )
    report_notes: ClassVar[tuple[str, ...]] = (
        (
            "apprentice: scheme A of Mishra & Marr; the teacher architecture is trained from scratch together with "
            "the student (row 'teacher_peer'), from its own losses (scheme.params.teacher_losses, default ce); the "
            "student learns the recipe's losses from the teacher's current, detached outputs"
        ),
    )
    example: ClassVar[dict[str, Any]] = {
        "losses": {"ce": {"weight": 0.5}, "kd": {"T": 1.0, "alpha": 1.0, "weight": 0.5}},  # beta, gamma, tau
    }
    Params = ApprenticeParams
    moved = COHORT_MOVED

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> FlowTask:
        """The recipe's student (the baseline's initialisation) and a fresh ``teacher:`` architecture.

        Raises:
            ConfigError: No teacher architecture, a teacher checkpoint, student losses that read
                no teacher, or teacher losses that read one.
        """
        spec = teacher_architecture(ctx, cls.registry_name)
        student_objective = ctx.objective()
        require_teacher_terms(student_objective, cls.registry_name, example="kd: {T: 1, alpha: 1, weight: 0.5}")
        own = teacher_objective(ctx, params.teacher_losses)
        teacher = ctx.model(spec, seed=peer_seed(seed, 1), where="teacher")
        return apprentice_task(ctx.student(seed), teacher, student_objective, own)
