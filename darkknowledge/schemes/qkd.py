"""QKD: quantization-aware knowledge distillation in three phases.

Kim, Bhalgat, Lee, Patel & Kwak, "QKD: Quantization-aware Knowledge Distillation",
arXiv:1911.12491, 2019. KD's regularisation can hurt a quantized student whose representation
is already reduced, so quantization and distillation are coordinated in three phases:

1. **Self-studying (SS)**: the quantized student, initialised from full-precision weights, is
   fine-tuned on the task loss alone, ``L_S = CE(y, p_S)``, to a good starting point.
2. **Co-studying (CS)**: the pre-trained full-precision teacher and the student are trained
   together, each learning from the other's predictions (the teacher adapts to become a better,
   more quantization-friendly teacher for this student)::

       L_S = CE(y, p_S) + tau^2 KL(p_T^tau || p_S^tau)      (p_T a constant)
       L_T = CE(y, p_T) + tau^2 KL(p_S^tau || p_T^tau)      (p_S a constant)

3. **Tutoring (TU)**: the co-studied teacher is frozen and teaches the student by KD, ``L_S`` as
   in CS.

Here the phases' objectives are the recipe's: SS is cross-entropy alone; in CS and TU the student
learns the recipe's ``losses`` from the teacher (``{ce: {}, kd: {T: 2, alpha: 1}}`` is the
``L_S`` above with ``tau = 2``), and in CS the teacher learns the same ``losses`` from the
student's detached outputs (``L_T``). The teacher in CS has its own optimizer
(``scheme.params.teacher_lr``: the recipe's optimizer at another learning rate, e.g. a small
one for a pre-trained network). Only the paper's abstract could be checked when this was
written: the three phases and what each trains are its; the two losses above, ``tau = 2`` and
the default split of ``train.epochs`` into 30/30/40 per cent for SS/CS/TU follow a public
re-implementation and are not checked against the paper's equations or schedules. The paper's
trainable (interval-learning) quantizer is the student model's business, not this plan's.

Plan: one resumable stage per phase, for each seed, the same student module trained in place
through all three; the student's low precision (``student: {quantize: ...}``) and its
full-precision initialisation (``student: {checkpoint: ...}``) are its model spec's:

* ``qkd-ss-s<seed>`` (role ``self_study``): the student alone, ``ce``;
* ``qkd-cs-s<seed>`` (role ``co_study``): a trainable copy of the recipe's pre-trained teacher
  (view and row ``teacher_peer``) and the student, two parts with their own optimizers: per
  batch the student steps on ``L_S`` against the teacher's detached outputs, then the teacher
  on ``L_T`` against the updated student's (deep mutual learning's alternating updates, so
  each model runs twice per batch and its batch-norm statistics see each batch twice);
* ``qkd-s<seed>`` (role ``student``, the exported model): the co-studied teacher, frozen (and
  cached when ``cache`` is on), teaches the student.

A phase of 0 epochs is skipped (``co_study_epochs: 0``: the pre-trained teacher tutors as it is).
A finished co-studying stage met again by ``--resume`` gives back its teacher from its
``last.pt``, so tutoring resumes against the same weights (its ``teacher_hash`` checks it).
Co-studying has two optimizers, so ``train.grad_accum`` must be 1 there (the engine says so).

Shapes: student and teacher map inputs ``(B, ...)`` to logits ``(B, K)``; each reads the
other's ``(B, K)`` logits (and tapped features) detached.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from darkknowledge.config import OptimizerConfig
from darkknowledge.data.batch import Batch, model_input
from darkknowledge.engine.checkpoint import load_weights, safe_load, state_hash
from darkknowledge.engine.task import MAIN, Part
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import Outputs
from darkknowledge.losses.objective import Objective
from darkknowledge.schemes.base import (
    MOVED_TO_LOSSES,
    Scheme,
    SchemeParams,
    register_scheme,
)
from darkknowledge.schemes.offline import offline_task
from darkknowledge.schemes.task import FlowTask
from darkknowledge.schemes.wiring import require_teacher_terms
from darkknowledge.teachers.flow import Flow, Link
from darkknowledge.teachers.peers import Peer

if TYPE_CHECKING:
    from darkknowledge.schemes.context import Context

log = logging.getLogger(__name__)

TEACHER = "teacher_peer"
"""The co-studied teacher's view, part and report row."""

PHASES = ("self_study_epochs", "co_study_epochs", "tutor_epochs")
DEFAULT_SPLIT = (0.3, 0.3, 0.4)
"""Default shares of ``train.epochs`` for SS, CS and TU (not verified against the paper)."""


class QKDParams(SchemeParams):
    """``scheme.params`` of ``qkd``: the phases' epochs (all three or none) and the teacher's rate."""

    self_study_epochs: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="SS epochs: the student alone with cross-entropy (0 skips it)"
    )
    co_study_epochs: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="CS epochs: teacher and student learn from each other (0 skips it)"
    )
    tutor_epochs: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="TU epochs: the frozen co-studied teacher teaches the student "
        "(default for all three: train.epochs split 30/30/40; given, the three add up to train.epochs)",
    )
    teacher_lr: Annotated[float, Field(gt=0.0)] | None = Field(
        default=None, description="the teacher's learning rate in co-studying (default: train.optimizer.lr)"
    )


def phase_epochs(
    total: int, given: tuple[int | None, int | None, int | None], split: tuple[float, float, float] = DEFAULT_SPLIT
) -> tuple[int, int, int]:
    """The epochs of SS, CS and TU: ``given`` when all three are set, else ``total`` split by ``split``.

    The default split rounds SS and CS half up and gives TU the rest, e.g. 10 -> (3, 3, 4),
    4 -> (1, 1, 2).

    Args:
        total: ``train.epochs``.
        given: ``(self_study_epochs, co_study_epochs, tutor_epochs)`` of ``scheme.params``.
        split: Shares of ``total`` for the default.

    Raises:
        ConfigError: Some but not all phases given, given phases that do not add up to
            ``total``, or a ``total`` too small to split with at least one epoch per phase.
    """
    named = dict(zip(PHASES, given))
    if all(v is None for v in given):
        if total < 3:
            raise ConfigError(
                f"train.epochs={total} is too few for QKD's three phases (self-studying, co-studying, "
                "tutoring: at least 1 epoch each by default); raise train.epochs, or set all of "
                f"scheme.params.{', '.join(PHASES)} (0 skips a phase)"
            )
        ss, cs = (int(total * share + 0.5) for share in split[:2])
        return ss, cs, total - ss - cs
    if any(v is None for v in given):
        missing = [k for k, v in named.items() if v is None]
        raise ConfigError(
            f"scheme.params: {', '.join(missing)} not set while "
            f"{', '.join(k for k in PHASES if k not in missing)} is; give all three phases' epochs "
            f"(adding up to train.epochs={total}) or none (train.epochs split 30/30/40)"
        )
    ss, cs, tu = (int(v) for v in given)  # type: ignore[arg-type]  # None: refused above
    if ss + cs + tu != total:
        raise ConfigError(
            f"scheme.params: self_study_epochs + co_study_epochs + tutor_epochs = {ss} + {cs} + {tu} "
            f"= {ss + cs + tu}, but train.epochs is {total}; make the phases add up to train.epochs "
            "(or leave all three out to split train.epochs 30/30/40)"
        )
    return ss, cs, tu


class CoStudyFlow(Flow):
    """The student and the teacher, each taught by the other's detached outputs.

    A step of part ``main`` computes the student's loss only, a step of part ``teacher_peer`` the
    teacher's only; the other view runs without gradients (its outputs are detached anyway).

    Args:
        student: The student (view ``student``).
        teacher: The teacher (view ``teacher_peer``).
        student_objective: What the student learns from the teacher.
        teacher_objective: What the teacher learns from the student.
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module, student_objective: Objective, teacher_objective: Objective
    ) -> None:
        links = [
            Link("student", student_objective, Peer(TEACHER, teacher)),
            Link(TEACHER, teacher_objective, Peer("student", student, name="student"), suffix=f"@{TEACHER}"),
        ]
        super().__init__({"student": student, TEACHER: teacher}, links)
        self.part_links = {MAIN: self.links[0], TEACHER: self.links[1]}

    def views_for(self, batch: Batch, learner: str) -> dict[str, Outputs]:
        """This step's outputs of both views; only ``learner`` keeps its autograd graph."""
        views = {}
        for name in self.view_names:
            if name == learner:
                views[name] = self.run_view(name, model_input(batch, self._modules[name]))
            else:
                with torch.no_grad():
                    views[name] = self.run_view(name, model_input(batch, self._modules[name]))
        return views

    def forward(
        self, batch: Batch, epoch_progress: float = 0.0, part: str = MAIN
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, {term: value})`` of the learner of ``part`` (``main``: the student)."""
        link = self.part_links.get(part)
        if link is None:
            return super().forward(batch, epoch_progress, part)
        loss, terms = link(self.views_for(batch, link.view), batch, epoch_progress)
        return loss, {k + link.suffix: v for k, v in terms.items()}


class CoStudyTask(FlowTask):
    """Co-studying: two parts, the student (``main``) then the teacher (``teacher_peer``) per batch.

    Args:
        flow: The co-studying flow.
        teacher_optimizer: The teacher's optimizer settings (None: the stage's).
        fingerprint: Hash of the pre-trained teacher weights the stage starts from (a resume
            must start from the same).
    """

    flow: CoStudyFlow

    def __init__(self, flow: CoStudyFlow, teacher_optimizer: OptimizerConfig | None, fingerprint: str) -> None:
        teacher = flow.get_submodule(TEACHER)
        super().__init__(flow, {"student": flow.get_submodule("student"), TEACHER: teacher})
        self.teacher_optimizer = teacher_optimizer
        self._fingerprint = fingerprint

    def parts(self) -> list[Part]:
        """The student's part (its model and objective), then the teacher's.

        Raises:
            ConfigError: A loss brings a discriminator (a third optimizer), which co-studying does not plan.
        """
        flow = self.flow
        found = flow.adversaries()
        if found:
            raise ConfigError(
                f"scheme 'qkd': co-studying trains the student and the teacher with one optimizer each "
                f"and cannot add the discriminators of {sorted(found)}; use losses without one"
            )
        student, teacher = flow.part_links[MAIN], flow.part_links[TEACHER]
        return [
            Part(MAIN, flow, exclude=(flow.get_submodule(TEACHER), teacher.objective)),
            Part(TEACHER, flow, self.teacher_optimizer, exclude=(flow.get_submodule("student"), student.objective)),
        ]

    def fingerprint(self) -> str | None:
        return self._fingerprint


def co_study_task(
    ctx: Context,
    student: nn.Module,
    teacher: nn.Module,
    pretrained_hash: str,
    teacher_lr: float | None,
    train_optimizer: OptimizerConfig,
) -> CoStudyTask:
    """The co-studying stage: ``student`` and ``teacher`` (trained in place) learn the recipe's ``losses``
    from each other.

    Args:
        ctx: The run's context (objectives).
        student: The self-studied student.
        teacher: A trainable copy of the pre-trained teacher.
        pretrained_hash: The pre-trained teacher's weights hash.
        teacher_lr: The teacher's learning rate (None: the stage's).
        train_optimizer: The stage's optimizer settings (the teacher's, at ``teacher_lr``).
    """
    optimizer = None if teacher_lr is None else OptimizerConfig(**{**train_optimizer.model_dump(), "lr": teacher_lr})
    flow = CoStudyFlow(student, teacher, ctx.objective(), ctx.objective())
    return CoStudyTask(flow, optimizer, pretrained_hash)


def trainable_copy(ctx: Context, pretrained: nn.Module) -> nn.Module:
    """A fresh model of the recipe's teacher architecture holding ``pretrained``'s weights, trainable
    (the run's teacher is shared by every seed and stays untouched)."""
    copy = ctx.model(ctx.cfg.teacher, where="teacher")
    copy.load_state_dict(pretrained.state_dict())
    copy.requires_grad_(True)
    return copy.train()


def reload_co_studied(ctx: Context, stage: str, teacher: nn.Module) -> None:
    """Load the co-studied teacher of a stage finished earlier (its ``last.pt``) into ``teacher``.

    Nothing happens without a stage folder (a dry run, no run folder): the teacher in memory is
    then the one the stage left.

    Raises:
        CheckpointError: The stage's ``last.pt`` is missing, damaged or holds no such teacher.
    """
    folder = ctx.stage_dir(stage)
    if folder is None:
        return
    path = folder / "last.pt"
    state = safe_load(path, hint=f"delete {str(folder)!r} to co-study again").get("module", {})
    prefix = f"{TEACHER}."
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    load_weights(teacher, own, path, where=f"stage {stage!r}'s co-studied teacher")
    log.info("[%s] finished earlier; its co-studied teacher is reloaded from %s", stage, path)


@register_scheme("qkd")
class QKD(Scheme):
    """QKD: self-studying, co-studying with the teacher, then tutoring by the co-studied teacher."""

    pretrained_teacher = True

    citation = "Kim, Bhalgat, Lee, Patel, Kwak. QKD: Quantization-aware Knowledge Distillation. arXiv:1911.12491, 2019."
    summary = (
        "three phases: the (quantized) student alone, then with the pre-trained teacher learning from each "
        "other, then taught by the co-studied teacher, frozen"
    )
    report_notes: ClassVar[tuple[str, ...]] = (
        (
            "qkd: per seed, 'self_study' is the student after self-studying (cross-entropy alone), 'co_study' the "
            "student after co-studying and 'teacher_peer' the co-studied copy of the pre-trained teacher (each "
            "learned the recipe's losses from the other's detached outputs), 'student' the student after tutoring "
            "by that teacher, frozen; each phase's epochs are its row's"
        ),
    )
    example: ClassVar[dict[str, Any]] = {
        "train": {
            "epochs": 4,
            "optimizer": {"name": "adamw", "lr": 0.01},
            "scheduler": {"name": "constant"},
            "deterministic": True,
            "device": "cpu",
        },
        "scheme": {"params": {"self_study_epochs": 1, "co_study_epochs": 1, "tutor_epochs": 2, "teacher_lr": 0.005}},
    }
    Params = QKDParams
    moved: ClassVar[dict[str, str]] = {k: MOVED_TO_LOSSES[k] for k in ("T", "weight", "alpha")}

    @classmethod
    def run(cls, ctx: Context, seed: int, params: Any) -> list[dict[str, Any]]:
        """Train SS, CS and TU for ``seed`` (each a resumable stage; a 0-epoch phase is skipped).

        Returns:
            The tutored student's entries first, then co-studying's (student, teacher), then self-studying's.

        Raises:
            ConfigError: Bad phase epochs, no pre-trained teacher, or losses that read no teacher.
        """
        budget = ctx.cfg.train
        if budget.steps is not None or budget.min_steps is not None:
            raise ConfigError(
                f"scheme 'qkd' splits train.epochs into its three phases; a budget in steps (train.steps="
                f"{budget.steps}, train.min_steps={budget.min_steps}) has no such split: set train.epochs "
                "(and, if you like, the phases' epochs) and leave train.steps and train.min_steps out"
            )
        ss, cs, tu = phase_epochs(
            budget.epochs, (params.self_study_epochs, params.co_study_epochs, params.tutor_epochs)
        )
        if ctx.cfg.teacher is None:
            raise ConfigError(
                "scheme 'qkd' needs a pre-trained full-precision teacher: add a `teacher:` section "
                "(model name, and `checkpoint:` or `train:` settings) to the recipe"
            )
        require_teacher_terms(ctx.objective(), cls.registry_name, example="kd: {T: 2, alpha: 1}")
        _refuse_extension(
            ctx, [(ctx.stage_name(seed, "ss"), ss), (ctx.stage_name(seed, "cs"), cs), (ctx.stage_name(seed), tu)]
        )
        transfer = ctx.uses_transfer(cls)
        pretrained = ctx.teacher()
        student = ctx.student(seed)
        out: list[dict[str, Any]] = []
        if ss:  # cross-entropy alone: the context's stage of a model trained on the labels
            out = [
                ctx.train_alone(
                    ctx.stage_name(seed, "ss"),
                    student,
                    seed,
                    role="self_study",
                    train_cfg=ctx.train_cfg({"epochs": ss}),
                )
            ]
        teacher = pretrained
        if cs:
            teacher = trainable_copy(ctx, pretrained)
            started = state_hash(teacher)
            train_cfg = ctx.train_cfg({"epochs": cs})
            task = co_study_task(ctx, student, teacher, started, params.teacher_lr, train_cfg.optimizer)
            stage = ctx.stage_name(seed, "cs")
            out = (
                ctx.train(
                    stage,
                    task,
                    seed,
                    role="co_study",
                    train_cfg=train_cfg,
                    with_transfer=transfer,
                    label=cls.registry_name,
                )
                + out
            )
            task.release()
            if state_hash(teacher) == started:  # finished in an earlier process: its teacher is in its last.pt
                reload_co_studied(ctx, stage, teacher)
        tutor = offline_task(student, ctx.objective(), ctx.frozen(teacher, TEACHER if cs else "teacher"))
        out = (
            ctx.train(
                ctx.stage_name(seed),
                tutor,
                seed,
                role="student",
                train_cfg=ctx.train_cfg({"epochs": tu}),
                with_transfer=transfer,
                label=cls.registry_name,
            )
            + out
        )
        return out


def _refuse_extension(ctx: Context, phases: list[tuple[str, int]]) -> None:
    """A resumed QKD run whose phases would change length once a later phase has trained: refused.

    The three phases train one student in place, each stage starting from the one before; a
    finished phase extended on ``--resume`` (``train.epochs`` raised) would train the student on
    while the later phases' checkpoints, taken from the shorter phase, overwrite it again.

    Raises:
        ConfigError: A phase's recorded epochs differ from ``phases`` and a later phase has trained.
    """
    recorded: list[int | None] = []
    for stage, _ in phases:
        folder = ctx.stage_dir(stage)
        model_pt = folder / "model.pt" if folder is not None else None
        result = safe_load(model_pt).get("result", {}) if model_pt is not None and model_pt.is_file() else {}
        recorded.append(result.get("epochs") if isinstance(result, dict) else None)
    for i, ((stage, epochs), had) in enumerate(zip(phases, recorded)):
        later = any(r is not None for r in recorded[i + 1 :])
        if had is not None and had != epochs and later:
            raise ConfigError(
                f"scheme 'qkd': stage {stage!r} trained {had} epochs and this run asks for {epochs}, but a later "
                "phase has already trained from it; the phases share one student, so a finished QKD run cannot be "
                "extended by --resume: start a new run (or keep train.epochs and the phases' epochs as they were)"
            )
