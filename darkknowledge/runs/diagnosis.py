"""Why distillation did not help: the likely causes a run can measure, with their numbers.

When the distilled student does not beat the student trained alone (the baseline) by more than
the seed spread, the verdict names each of these that its numbers show, and only those:

- **Nothing to transfer**: the teacher's test accuracy is no better than the baseline's by more
  than :data:`TEACHER_MARGIN` points (the best teacher, when there are several).
- **A memorised teacher**: its accuracy on its own training split is at least
  :data:`MEMORISED_ACC` % and the mean of its top softmax probability there (``train_confidence``)
  exceeds :data:`MEMORISED_CONFIDENCE`. Its soft targets on the training inputs are then near
  one-hot and carry little beyond the labels; function matching (Beyer et al., "Knowledge
  distillation: A good teacher is patient and consistent", CVPR 2022: mixed inputs between the
  training points, where the teacher is not one-hot) is what helps.
- **Too few steps**: the distilled student took fewer than :data:`MIN_STEPS` optimizer steps, or its
  mean training loss still fell by at least :data:`STILL_FALLING` % at its end (over its last
  epoch, or its last tenth of epochs)
  (``loss_drop``, from ``metrics.jsonl``; a schedule that decays the rate to 0, such as cosine,
  flattens the loss at the end whatever the budget, hence the floor on steps too). Matching a
  teacher takes longer than fitting labels (Beyer et al.: a good teacher is *patient*); a longer
  budget (``train.steps``) trains the student further.

A cause whose numbers are missing (a teacher given as a module has no training accuracy; a
one-epoch stage has no trend) is not named. :func:`teacher_lines` are the report's lines under the
table about its teachers: calibration, fit of the training split, and a warning for each memorised
one (:func:`memorised_warnings`), whatever the verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from darkknowledge.engine.fidelity import ECE_BINS

TEACHER_MARGIN = 1.0
"""Points of test accuracy a teacher must have over the student alone to have something to transfer."""

MEMORISED_ACC = 99.9
"""Training-split accuracy (%) from which a teacher counts as having memorised it (with its confidence)."""

MEMORISED_CONFIDENCE = 0.99
"""Mean top softmax probability on the training split above which a teacher's soft targets are near one-hot."""

STILL_FALLING = 5.0
"""Relative drop (%) of the training loss at the end of a stage (:func:`loss_drop`) from which it is still learning."""

MIN_STEPS = 500
"""Optimizer steps under which a distilled student's budget counts as too short to match its teacher."""


def loss_drop(records: Sequence[Mapping[str, Any]]) -> float | None:
    """Relative drop (%) of the mean training loss over the end of a stage: from the mean of the
    next-to-last tenth of its epochs to the mean of the last tenth (the last two epochs when it has
    fewer than 20: a small set's epochs are a step or two each, whose losses are noise alone).

    Args:
        records: The stage's ``metrics.jsonl`` records (``kind: train`` ones carry ``train/loss``).

    Returns:
        ``100 * (previous - last) / |previous|`` (negative: the loss rose), or None with fewer than
        two epochs with a loss, or a previous loss of 0.
    """
    losses: dict[int, float] = {}
    for r in records:
        if r.get("kind") == "train" and r.get("epoch") is not None and isinstance(r.get("train/loss"), int | float):
            losses[int(r["epoch"])] = float(r["train/loss"])  # a resumed epoch's later record wins
    if len(losses) < 2:
        return None
    ordered = [losses[e] for e in sorted(losses)]
    k = max(1, len(ordered) // 10)
    last = sum(ordered[-k:]) / k
    previous = sum(ordered[-2 * k : -k]) / k
    if previous == 0:
        return None
    return 100.0 * (previous - last) / abs(previous)


def _value(row: Mapping[str, Any], key: str) -> float | None:
    """``row[key]`` as a float; None when absent or NaN."""
    value = row.get(key)
    if not isinstance(value, int | float) or value != value:
        return None
    return float(value)


def is_memorised(row: Mapping[str, Any]) -> bool:
    """Whether a teacher's row (or entry) shows it memorised its training split (see the module)."""
    acc, confidence = _value(row, "train_acc"), _value(row, "train_confidence")
    return acc is not None and confidence is not None and acc >= MEMORISED_ACC and confidence > MEMORISED_CONFIDENCE


def _teacher_name(row: Mapping[str, Any]) -> str:
    return str(row.get("model") or row.get("name") or "teacher")


def memorised_warnings(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One warning per memorised teacher row: its training accuracy and mean top probability there."""
    return [
        f"warning: the teacher {_teacher_name(r)} has memorised its training set (training accuracy "
        f"{r['train_acc']:.2f}%, mean top probability {r['train_confidence']:.3f}): its soft targets are near "
        "one-hot on the training set; function matching (mixed inputs) is what helps here"
        for r in rows
        if r.get("role") == "teacher" and is_memorised(r)
    ]


def teacher_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The report's lines under the table about its teachers: each one's calibration on the test split and fit
    of its training split where measured, then a warning for each memorised one."""
    lines = []
    for r in rows:
        if r.get("role") != "teacher":
            continue
        parts = []
        if (ece := _value(r, "ece")) is not None:
            parts.append(f"ECE {ece:.2f}% on the test split ({ECE_BINS} equal-width bins)")
        if (acc := _value(r, "train_acc")) is not None:
            fit = f"training split accuracy {acc:.2f}%"
            if (confidence := _value(r, "train_confidence")) is not None:
                fit += f", mean top probability {confidence:.3f}"
            parts.append(fit)
        if parts:
            lines.append(f"teacher {_teacher_name(r)}: " + "; ".join(parts))
    return lines + memorised_warnings(rows)


def causes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The measured likely causes of a distilled student that does not beat its baseline (see the module).

    Args:
        rows: The report's rows (:func:`~darkknowledge.runs.report.group_rows`): ``teacher``,
            ``baseline`` and ``student`` rows with ``last_mean`` (and, where recorded,
            ``train_acc``, ``train_confidence``, ``loss_drop``).

    Returns:
        One clause per cause, with its numbers (empty: none is measured).
    """
    base = next((r for r in rows if r.get("role") == "baseline"), None)
    kd = next((r for r in rows if r.get("role") == "student"), None)
    teachers = [r for r in rows if r.get("role") == "teacher" and _value(r, "last_mean") is not None]
    found = []
    base_acc = _value(base, "last_mean") if base is not None else None
    if teachers and base_acc is not None:
        best = max(teachers, key=lambda r: float(r["last_mean"]))
        if best["last_mean"] <= base_acc + TEACHER_MARGIN:
            found.append(
                f"the teacher ({_teacher_name(best)}, {best['last_mean']:.2f}%) is no better than the student alone "
                f"({base_acc:.2f}%; margin {TEACHER_MARGIN:g} point): nothing to transfer"
            )
    for r in teachers:
        if is_memorised(r):
            found.append(
                f"the teacher {_teacher_name(r)} is overconfident on its training set (training accuracy "
                f"{r['train_acc']:.2f}%, mean top probability {r['train_confidence']:.3f}): its soft targets on the "
                "training inputs are near one-hot; try function matching (recipe function_matching: mixed views, "
                "data.augment.mixup)"
            )
    if kd is not None:
        found += _too_few_steps(kd)
    return found


def _too_few_steps(kd: Mapping[str, Any]) -> list[str]:
    """The "too few steps" clause for the student's row, when its steps or its loss trend show it."""
    drop, steps = _value(kd, "loss_drop"), _value(kd, "steps")
    shown = []
    if steps is not None and steps < MIN_STEPS:
        shown.append(f"it took {steps:.0f} optimizer steps (under {MIN_STEPS})")
    if drop is not None and drop >= STILL_FALLING:
        shown.append(f"its training loss still fell {drop:.1f}% at its end")
    if not shown:
        return []
    return [f"too few steps for the student: {' and '.join(shown)}; train it longer (train.epochs or train.steps)"]
