"""Keep the better student: the distilled one, or the same student trained alone.

A distilled student can end up worse than the same network trained on the labels alone: a
teacher no better than the student has nothing to transfer, and listening to it costs accuracy
(``dk bench small-data``: on 50 labelled 8x8 digits a CNN teacher 0.8 points below the MLP
alone made every objective that listens to it lose about 3.4 points). Stanton et al. ("Does
Knowledge Distillation Really Work?", NeurIPS 2021) show that such failures are common and not
visible from the training loss. The only sure guard is to measure: train the student alone as
well, from the same initialisation with the same budget, and deliver whichever is better on the
**validation split** (never the test split, which stays an unbiased estimate of the delivered
model).

The rule (:func:`kept`): the student alone is kept only when its last-epoch validation accuracy
is strictly higher; a tie keeps the distilled student (the user asked for distillation). The
offline scheme applies it with ``scheme.params.keep_better`` (``dk distill``, ``dk bench``);
``dk.distill``'s default objective turns it on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from darkknowledge.errors import ConfigError

ALONE = "alone"
DISTILLED = "distilled"


def kept(alone_val: float | None, distilled_val: float | None) -> str:
    """Which student to deliver from their validation accuracies (%).

    Args:
        alone_val: The student trained alone, last-epoch top-1 on the validation split.
        distilled_val: The distilled student, the same.

    Returns:
        ``"alone"`` when the student alone is strictly better; else ``"distilled"`` (also when a
        value is unmeasured: a dry run).
    """
    if alone_val is None or distilled_val is None or math.isnan(alone_val) or math.isnan(distilled_val):
        return DISTILLED
    return ALONE if alone_val > distilled_val else DISTILLED


def selection(alone: Mapping[str, Any], distilled: Mapping[str, Any]) -> dict[str, Any]:
    """The choice between two results entries, as recorded in both.

    Args:
        alone: The results entry of the student trained alone (``val_acc``, ``train_seconds``).
        distilled: The distilled student's entry.

    Returns:
        ``{"kept", "val_acc": {"alone", "distilled"}, "stages": {"alone", "distilled"},
        "train_seconds"}``: ``train_seconds`` is what both cost together (the delivered student's
        real training cost).
    """
    val = {ALONE: alone.get("val_acc"), DISTILLED: distilled.get("val_acc")}
    return {
        "kept": kept(val[ALONE], val[DISTILLED]),
        "val_acc": val,
        "stages": {ALONE: alone.get("name"), DISTILLED: distilled.get("name")},
        "train_seconds": round(
            float(alone.get("train_seconds") or 0.0) + float(distilled.get("train_seconds") or 0.0), 3
        ),
    }


def require_validation(has_validation: bool, where: str = "scheme.params.keep_better") -> None:
    """Fail before training when there is no validation split to choose on.

    Raises:
        ConfigError: ``has_validation`` is False.
    """
    if not has_validation:
        raise ConfigError(
            f"{where}: choosing between the distilled student and the student alone needs a validation "
            "split (the test split must stay unbiased); set data.val_fraction in (0, 1), e.g. 0.1, or "
            f"turn {where.rsplit('.', 1)[-1]} off"
        )


def kept_line(choice: Mapping[str, Any]) -> str:
    """One sentence for reports: which student was kept and why."""
    val = choice["val_acc"]
    a, d = val.get(ALONE), val.get(DISTILLED)
    if a is None or d is None:
        return "Kept: the distilled student."
    if choice["kept"] == ALONE:
        return (
            f"Kept: the student trained alone ({a:.2f}% on the validation split vs {d:.2f}% distilled): "
            "distillation did not help here, so the delivered student is the one trained alone."
        )
    return f"Kept: the distilled student ({d:.2f}% on the validation split vs {a:.2f}% for the student alone)."
