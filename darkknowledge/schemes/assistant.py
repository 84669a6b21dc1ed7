"""Teacher-assistant knowledge distillation (TAKD): teacher -> assistant(s) -> student.

Mirzadeh, Farajtabar, Li, Levine, Matsukawa & Ghasemzadeh, "Improved Knowledge Distillation
via Teacher Assistant", AAAI 2020 (arXiv:1902.03393). When the capacity gap between teacher
and student is large, distillation works better through intermediate-size *teacher
assistants* (TAs): each link of the chain is trained by KD from the previous one with the
paper's student objective ``L_student = (1 - lambda) L_SL + lambda L_KD`` (Eq. 3, with
``L_SL`` the cross-entropy on labels and ``L_KD = tau^2 KL`` of the softened outputs)::

    L_link = (1 - lambda) * CE(y, softmax(z_s)) + lambda * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

with ``z_t`` the logits of the previous, already trained and frozen link (the teacher for the
first TA). The per-link loss is the recipe's ``losses`` (``kd`` with ``alpha = lambda``, ``T = tau``).
The paper's multi-step distillation (a path of several TAs of decreasing size) is
``num_assistants > 1`` or several ``assistants``.

Assistants are either given (``assistants:``) or interpolated between teacher and student of
one zoo family (mlp widths/depth, cnn1d channels/depth, CIFAR ResNet depth, WRN depth/width).

Design decision: assistants are trained per seed (each seed's chain is independent), so the
student's mean ± std over seeds includes the assistants' variation; the teacher is the
recipe's pre-trained teacher, shared across seeds as in every offline scheme.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field
from torch import nn

from darkknowledge.config import ModelConfig
from darkknowledge.errors import ConfigError
from darkknowledge.models import count_params
from darkknowledge.schemes.base import Scheme, SchemeParams, register_scheme
from darkknowledge.schemes.chain import Stage, run_chain

if TYPE_CHECKING:
    from darkknowledge.schemes.context import Context

log = logging.getLogger(__name__)
Spacing = Literal["geometric", "linear"]
RESNET_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
RESNET_X4_DEPTHS = (8, 32)
_BUILT_IN = ("num_classes", "input_shape")


def interpolate(a: float, b: float, frac: float, spacing: Spacing = "geometric") -> float:
    """The point ``frac`` of the way from ``a`` (frac 0) to ``b`` (frac 1).

    Args:
        a: Start value (> 0 for geometric spacing).
        b: End value (> 0 for geometric spacing).
        frac: Position in [0, 1].
        spacing: ``geometric`` (``a * (b / a) ** frac``, even steps in log size) or ``linear``.
    """
    if spacing == "geometric":
        return a * (b / a) ** frac
    return a + (b - a) * frac


def _resample(widths: tuple[int, ...], depth: int) -> list[int]:
    """Widths of a ``depth``-layer stack read at the same relative depth of ``widths``."""
    if depth == 0 or not widths:
        return []
    if depth == 1:
        return [widths[-1]]
    return [widths[round(j * (len(widths) - 1) / (depth - 1))] for j in range(depth)]


def _family(name: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """A model's interpolable family and its size parameters, or None when it has none."""
    if name == "mlp":
        return "mlp", {"hidden": tuple(params.get("hidden", (100, 100)))}
    if name == "cnn1d":
        return "cnn1d", {k: int(params.get(k, d)) for k, d in (("channels", 32), ("depth", 3), ("kernel_size", 5))}
    m = re.fullmatch(r"resnet(\d+)(x4)?", name)
    if m:
        return ("resnet_x4" if m.group(2) else "resnet"), {"depth": int(m.group(1))}
    m = re.fullmatch(r"wrn_(\d+)_(\d+)", name)
    if m:
        return "wrn", {"depth": int(m.group(1)), "widen": int(m.group(2))}
    if name == "wrn":
        return "wrn", {"depth": int(params.get("depth", 16)), "widen": int(params.get("widen", 2))}
    return None


def _pick_depths(low: int, high: int, candidates: tuple[int, ...], fracs: list[float], where: str) -> list[int]:
    """Distinct depths strictly between ``low`` and ``high``, nearest to each interpolated target."""
    free = [d for d in candidates if min(low, high) < d < max(low, high)]
    if len(free) < len(fracs):
        raise ConfigError(
            f"{where}: only {len(free)} depth(s) lie strictly between {low} and {high} "
            f"({free or 'none'}), not enough for {len(fracs)} assistant(s); lower num_assistants "
            "or give `assistants:` explicitly"
        )
    picked: list[int] = []
    for frac in fracs:
        target = interpolate(low, high, frac, "linear")
        best = min((d for d in free if d not in picked), key=lambda d: abs(d - target))
        picked.append(best)
    return picked


def interpolate_assistants(
    teacher: ModelConfig, student: ModelConfig, num: int, spacing: Spacing = "geometric"
) -> list[ModelConfig]:
    """Model specs between ``teacher`` and ``student`` of one zoo family, largest first.

    Assistant ``i`` (1 = next to the teacher) sits at ``frac = 1 - i / (num + 1)`` of the way
    from the student to the teacher: widths/channels interpolated (``spacing``), depths
    linearly (rounded; ResNet/WRN depths snap to valid ones strictly between the two).

    Args:
        teacher: The teacher's spec (name, params).
        student: The student's spec.
        num: Number of assistants (>= 1).
        spacing: Width spacing, ``geometric`` or ``linear``.

    Raises:
        ConfigError: The two models are not of one interpolable family, or there is no room.
    """
    where = "scheme.params.num_assistants"
    ft, fs = _family(teacher.name, teacher.params), _family(student.name, student.params)
    if ft is None or fs is None or ft[0] != fs[0]:
        raise ConfigError(
            f"scheme 'assistant': cannot interpolate assistants between teacher {teacher.name!r} and student "
            f"{student.name!r}: they are not of one interpolable family (mlp, cnn1d, resnet8..110, resnet8x4/32x4, "
            "wrn). Give the assistants explicitly, e.g. `scheme: {name: assistant, params: {assistants: "
            "[{name: cnn1d, params: {channels: 16}}]}}`"
        )
    family, t, s = ft[0], ft[1], fs[1]
    fracs = [1.0 - i / (num + 1) for i in range(1, num + 1)]
    out: list[ModelConfig] = []
    if family == "mlp":
        for frac in fracs:
            depth = round(interpolate(len(s["hidden"]), len(t["hidden"]), frac, "linear"))
            ws, wt = _resample(s["hidden"], depth), _resample(t["hidden"], depth)
            hidden = [max(1, round(interpolate(a, b, frac, spacing))) for a, b in zip(ws, wt)]
            out.append(ModelConfig(name="mlp", params={**student.params, "hidden": hidden}))
    elif family == "cnn1d":
        for frac in fracs:
            params = {
                **student.params,
                "channels": max(1, round(interpolate(s["channels"], t["channels"], frac, spacing))),
                "depth": round(interpolate(s["depth"], t["depth"], frac, "linear")),
            }
            if s["kernel_size"] != t["kernel_size"]:
                # odd: same-length padding
                params["kernel_size"] = round(interpolate(s["kernel_size"], t["kernel_size"], frac, "linear")) | 1
            out.append(ModelConfig(name="cnn1d", params=params))
    elif family in ("resnet", "resnet_x4"):
        depths = _pick_depths(
            s["depth"], t["depth"], RESNET_X4_DEPTHS if family == "resnet_x4" else RESNET_DEPTHS, fracs, where
        )
        suffix = "x4" if family == "resnet_x4" else ""
        out = [ModelConfig(name=f"resnet{d}{suffix}", params={}) for d in depths]
    else:  # wrn: depth 6n + 4, widen interpolated
        high = max(s["depth"], t["depth"])
        candidates = tuple(range(10, high + 1, 6))
        same_depth = s["depth"] == t["depth"]
        depths = [s["depth"]] * num if same_depth else _pick_depths(s["depth"], t["depth"], candidates, fracs, where)
        for frac, depth in zip(fracs, depths):
            widen = max(1, round(interpolate(s["widen"], t["widen"], frac, spacing)))
            out.append(ModelConfig(name="wrn", params={"depth": depth, "widen": widen}))
    return out


def _spec_of(model: nn.Module) -> ModelConfig:
    """A zoo model's own spec, without the dataset-filled parameters."""
    params = {k: v for k, v in getattr(model, "dk_params", {}).items() if k not in _BUILT_IN}
    return ModelConfig(name=getattr(model, "dk_name", type(model).__name__), params=params)


def check_sizes(sizes: list[tuple[str, int]]) -> None:
    """Raise unless the chain's parameter counts strictly decrease from teacher to student.

    Args:
        sizes: ``(name, params)`` along the chain, teacher first, student last.
    """
    for (a, pa), (b, pb) in zip(sizes, sizes[1:]):
        if not pb < pa:
            chain = " -> ".join(f"{n} ({p})" for n, p in sizes)
            raise ConfigError(
                f"scheme 'assistant': the chain must shrink at every link, but {b} has {pb} parameters, "
                f"not fewer than {a} ({pa}). Chain: {chain}. Give smaller assistants, fewer of them, "
                "or a larger gap between teacher and student"
            )


class AssistantParams(SchemeParams):
    """``scheme.params`` of ``assistant``."""

    assistants: list[ModelConfig] | None = Field(
        default=None, description="explicit assistant specs, largest (next to the teacher) first"
    )
    num_assistants: Annotated[int, Field(ge=1, le=8)] = Field(
        default=1, description="how many assistants to interpolate when assistants is not given"
    )
    spacing: Spacing = Field(default="geometric", description="width interpolation: geometric or linear")
    assistant_train: dict[str, Any] | None = Field(
        default=None, description="overrides of train for the assistant stages"
    )
    assistant_losses: dict[str, dict[str, Any] | None] | None = Field(
        default=None, description="losses of the assistant stages (default: the recipe's losses)"
    )
    plain_kd: bool = Field(
        default=False, description="also distill a student from the teacher directly (same init), as a comparison row"
    )


@register_scheme("assistant")
class TeacherAssistant(Scheme):
    """TAKD: the pre-trained teacher teaches assistant 1, which teaches assistant 2 ..., the last the student."""

    pretrained_teacher = True

    default_transfer = True
    citation = "Mirzadeh et al., Improved Knowledge Distillation via Teacher Assistant, AAAI 2020."
    summary = "teacher -> assistant(s) of intermediate size -> student, each link distilled from the previous one"
    report_notes: ClassVar[tuple[str, ...]] = (
        "assistants are trained per seed by KD from the previous link (the first from the teacher); "
        "the student is distilled from the last assistant, never from the teacher directly",
    )

    example: ClassVar[dict[str, Any]] = {
        "scheme": {"params": {"assistants": [{"name": "mlp", "params": {"hidden": [24]}}]}}
    }
    Params = AssistantParams

    @classmethod
    def run(cls, ctx: Context, seed: int, params: Any) -> list[dict[str, Any]]:
        """Train the chain for ``seed``; the student's entry comes first."""
        assistants, num_assistants, spacing = params.assistants, params.num_assistants, params.spacing
        assistant_losses, assistant_train, plain_kd = params.assistant_losses, params.assistant_train, params.plain_kd
        teacher = ctx.teacher()
        student = ctx.student(seed)
        specs = (
            list(assistants)
            if assistants
            else interpolate_assistants(_spec_of(teacher), _spec_of(student), num_assistants, spacing)
        )
        models = [ctx.model(spec, seed=seed, where=f"scheme.params.assistants.{i}") for i, spec in enumerate(specs)]
        sizes = (
            [("teacher", count_params(teacher))]
            + [(f"assistant{i + 1}", count_params(m)) for i, m in enumerate(models)]
            + [("student", count_params(student))]
        )
        if assistants:  # given: the user may bridge an architecture gap rather than a size gap
            try:
                check_sizes(sizes)
            except ConfigError as exc:
                log.info("%s (continuing: the assistants were given explicitly)", exc)
        else:
            check_sizes(sizes)
        ta_cfg = ctx.train_cfg(assistant_train, "scheme.params.assistant_train")
        transfer = ctx.uses_transfer(cls)
        links, prev, prev_name = [], teacher, "teacher"
        for i, model in enumerate(models, 1):
            links.append(
                Stage(
                    part=f"ta{i}",
                    model=model,
                    teacher=prev,
                    losses=assistant_losses or ctx.cfg.losses,
                    role=f"assistant{i}",
                    train_cfg=ta_cfg,
                    with_transfer=transfer,
                    label=cls.registry_name,
                    where=f"scheme.params.assistants.{i - 1}",
                    teacher_name=prev_name,
                )
            )
            prev, prev_name = model, f"assistant{i}"
        links.append(
            Stage(
                part=None,
                model=student,
                teacher=prev,
                losses=ctx.cfg.losses,
                role="student",
                with_transfer=transfer,
                label=cls.registry_name,
                where="losses",
                teacher_name=prev_name,
            )
        )
        entries = run_chain(ctx, seed, links)
        if plain_kd:
            direct = Stage(
                part="kd",
                model=ctx.student(seed),
                teacher=teacher,
                losses=ctx.cfg.losses,
                role="direct_kd",
                with_transfer=transfer,
                label="+".join(ctx.cfg.losses),
                where="losses",
                teacher_name="teacher",
            )
            entries += run_chain(ctx, seed, [direct])
        return entries


__all__ = ["TeacherAssistant", "check_sizes", "interpolate", "interpolate_assistants"]
