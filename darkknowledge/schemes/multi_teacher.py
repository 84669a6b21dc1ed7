"""Multi-teacher distillation: several frozen, pre-trained teachers teach one student.

The teachers are the recipe's ``teacher`` then each of ``teachers`` (any architectures with the
student's classes). How their knowledge is combined (``aggregation``):

* ``mean``: the student's response losses see the average of the softened teacher
  distributions, ``p_mix^T = 1/N sum_i softmax(z_i / T)`` (Hinton, Vinyals & Dean 2015: an
  ensemble's soft targets are the arithmetic mean of its members' predictive distributions). The
  mixed teacher's logits are ``z_mix = T * log(p_mix^T)`` (see
  :func:`~darkknowledge.teachers.mix.mixture_logits`), so every response loss of the
  catalog (``kd``, ``dist``, ``dkd``, ...) reads the mixture unchanged.
* ``weighted``: ``p_mix^T = sum_i w_i softmax(z_i / T)`` with fixed ``weights`` (normalised).
* ``confidence``: per-sample weights ``w_i(x)``; ``ce`` = CA-MKD (Zhang, Chen & Wang,
  "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022, sample-wise weights
  ``w_i = (1 - softmax_i(CE(z_i, y))) / (N - 1)``), ``entropy`` = EBKD (Kwon et al., ICASSP 2020:
  ``w_i = (1 - H_i / sum_j H_j) / (N - 1)``); both formulas as in the CA-MKD authors' code
  (Rorozhl/CA-MKD, ``helper/loops.py``). ``correct`` = uniform over the teachers whose argmax
  is the label. Unlabelled samples get uniform weights from the label rules. One difference
  from both papers: they weigh each teacher's KL term, here the weights mix the teachers'
  probabilities (one mixed teacher, so any response loss applies).
* ``random``: one teacher drawn uniformly per training step (Fukuda, Suzuki, Kurata, Thomas,
  Cui & Ramabhadran, "Efficient Knowledge Distillation from an Ensemble of Teachers",
  Interspeech 2017: the teacher labels are switched at the mini-batch level); only that teacher runs.
* ``per_teacher``: the recipe's teacher-reading terms are built once per teacher, each bound to
  (student, teacher_i) with its own adapters, and **averaged**: ``L = L_shared + 1/N sum_i L_i``
  (terms ``kd@t0``, ``fitnet@t1``, ...; ``L_shared`` = terms reading no teacher, such as ``ce``,
  counted once). Feature and relation losses work with several teachers this way.

The three mixing aggregations build one teacher of logits only (a
:class:`~darkknowledge.teachers.mixture.Mixture`, mixed at the temperature ``T`` of the losses
that read it, read off the losses, never guessed), so losses reading teacher features need
``per_teacher`` or ``random``. ``random`` also builds one objective per teacher (terms keep
their names: the drawn teacher's value) and adds ``0 * sum(params)`` of the other teachers'
adapters, so DDP sees every parameter in every step. Every teacher is a frozen teacher
(:class:`~darkknowledge.teachers.frozen.Frozen`): the recipe's ``cache`` applies to each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, cast

from pydantic import Field

from darkknowledge.errors import ConfigError
from darkknowledge.losses.objective import Objective
from darkknowledge.schemes.base import Scheme, SchemeParams, register_scheme
from darkknowledge.schemes.task import FlowTask
from darkknowledge.schemes.wiring import require_teacher_terms, taught
from darkknowledge.teachers.flow import Flow
from darkknowledge.teachers.frozen import Frozen
from darkknowledge.teachers.mixture import Mixture, Rule

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from darkknowledge.schemes.context import Context

Aggregation = Literal["mean", "weighted", "confidence", "random", "per_teacher"]
MIXING = ("mean", "weighted", "confidence")


class MultiTeacherParams(SchemeParams):
    """``scheme.params`` of ``multi_teacher``."""

    aggregation: Aggregation = Field(default="mean", description="how the teachers are combined")
    weights: list[Annotated[float, Field(ge=0.0)]] | None = Field(
        default=None, description="weighted: one weight per teacher, in the order teacher, teachers.0, ..."
    )
    confidence: Literal["ce", "entropy", "correct"] | None = Field(
        default=None, description="confidence: ce (CA-MKD, default), entropy (EBKD) or correct"
    )
    T: Annotated[float, Field(gt=0.0)] | None = Field(
        default=None,
        description="mean/weighted/confidence: the temperature at which probabilities are mixed "
        "(default: the T of the losses that read the mixture, else 1)",
    )


def mixing_temperature(objective: Objective, given: float | None) -> float:
    """The temperature of the losses that soften the mixed teacher (``given`` wins)."""
    if given is not None:
        return given
    temps = objective.temperatures()
    if len(set(temps.values())) > 1:
        raise ConfigError(
            f"multi_teacher: the losses soften logits at different temperatures {temps}; set "
            "scheme.params.T to choose the one at which teacher probabilities are mixed"
        )
    return next(iter(temps.values()), 1.0)


def multi_teacher_task(
    student: nn.Module,
    make: Callable[[], Objective],
    teachers: list[Frozen],
    aggregation: str = "mean",
    weights: list[float] | None = None,
    confidence: str | None = None,
    T: float | None = None,
    seed: int = 0,
) -> FlowTask:
    """``teachers`` (>= 2) teach ``student`` through ``make()``, combined by ``aggregation``."""
    names = [t.name for t in teachers]
    if len(teachers) < 2:
        raise ConfigError(
            f"scheme multi_teacher needs at least 2 teachers, got {len(teachers)} ({names}); add a "
            "`teachers:` list to the recipe, e.g. teachers: [{name: cnn1d, seed: 1}]"
        )
    if weights is not None and aggregation != "weighted":
        raise ConfigError(f"scheme.params.weights is only used with aggregation 'weighted' (got {aggregation!r})")
    if confidence is not None and aggregation != "confidence":
        raise ConfigError(f"scheme.params.confidence is only used with aggregation 'confidence' (got {aggregation!r})")
    if T is not None and aggregation not in MIXING:
        raise ConfigError(
            f"scheme.params.T is only used with mean/weighted/confidence, not {aggregation!r} "
            "(each teacher's losses use their own T)"
        )
    if aggregation == "weighted" and weights is None:
        raise ConfigError(
            f"aggregation 'weighted' needs scheme.params.weights: one weight per teacher "
            f"({len(teachers)}: {', '.join(names)})"
        )
    objective = make()
    require_teacher_terms(objective, "multi_teacher", "kd: {T: 4, alpha: 0.9}")
    if aggregation in MIXING:
        rule = cast(Rule, aggregation)  # one of MIXING
        mixed = Mixture(teachers, rule, weights, confidence or "ce", T=mixing_temperature(objective, T))
        links = taught("student", make, [mixed])
    else:
        if aggregation == "random":
            for t in teachers:  # only the drawn teacher runs in a step
                t.lookahead = False
        links = taught(
            "student",
            make,
            teachers,
            mode="draw" if aggregation == "random" else "mean",
            seed=seed,
            teacher_suffixes=[f"@t{i}" for i in range(len(teachers))] if aggregation == "per_teacher" else None,
        )
    flow = Flow({"student": student}, links)
    return FlowTask(flow, {"student": flow.view_model("student")})


@register_scheme("multi_teacher")
class MultiTeacher(Scheme):
    """Several frozen teachers -> one student, aggregated by mean/weights/confidence, a random
    teacher per step, or one loss per teacher (see module docstring)."""

    default_transfer = True
    citation = (
        "Hinton et al. 2015 (ensemble mean); Fukuda et al., Interspeech 2017 (random teacher per step); "
        "Zhang et al., CA-MKD, ICASSP 2022; Kwon et al., EBKD, ICASSP 2020 (confidence weights)."
    )
    summary = (
        "several frozen teachers teach one student: mixed soft labels, a random teacher per step, or a loss per teacher"
    )
    report_notes: ClassVar[tuple[str, ...]] = (
        "multi_teacher: every teacher of the recipe (`teacher`, then `teachers`) teaches the student; the teacher "
        "rows list each one",
    )
    Params = MultiTeacherParams
    example: ClassVar[dict[str, Any]] = {"teachers": [{"name": "mlp", "params": {"hidden": [32]}, "seed": 1}]}
    moved = {"temperature": "renamed to T (one name for every temperature): scheme.params.T"}

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> FlowTask:
        """The student (seed's init) taught by every teacher of the recipe."""
        teachers = [ctx.frozen(model, where) for where, model in ctx.teachers()]
        return multi_teacher_task(
            ctx.student(seed),
            ctx.objective,
            teachers,
            params.aggregation,
            params.weights,
            params.confidence,
            params.T,
            seed,
        )

    @classmethod
    def label(cls, ctx: Context, params: Any) -> str:
        return f"multi_teacher[{params.aggregation}]:" + "+".join(ctx.cfg.losses)
