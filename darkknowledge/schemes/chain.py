"""A chain of offline stages: each link trains one model, taught by an earlier link or a teacher.

Shared by the ``assistant`` (TAKD) and ``pipeline`` schemes. Each link is one resumable
stage of the run (``ctx.train``): a finished link is reloaded on ``--resume`` and an
unfinished one continues from its ``last.pt``. A link's teacher is a model trained in place by
an earlier link (or a pre-trained recipe teacher); it is frozen only when its pupil's stage
starts, so the teacher hash stored in the pupil's checkpoints is that of the trained weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from darkknowledge.config import TrainConfig
from darkknowledge.errors import ConfigError
from darkknowledge.schemes.offline import offline_task
from darkknowledge.schemes.task import FlowTask
from darkknowledge.teachers.frozen import Frozen

if TYPE_CHECKING:
    from darkknowledge.schemes.context import Context

log = logging.getLogger(__name__)
CE_ONLY: dict[str, dict[str, Any]] = {"ce": {}}


@dataclass
class Stage:
    """One stage of a chain.

    Attributes:
        part: Stage part name; the stage is ``ctx.stage_name(seed, part)`` (None: the scheme's main stage).
        model: The model this stage trains (in place).
        teacher: The frozen teacher of this stage (an earlier link's model, a recipe teacher) or None.
        losses: The stage's losses config (None: cross-entropy alone).
        role: Role of the stage's model in the report (``student`` for the last link).
        train_cfg: Training settings (None: the recipe's ``train``).
        with_transfer: Whether the stage also sees the unlabeled transfer set.
        label: The report's method column.
        where: Config path for error messages.
        teacher_name: Name of the teacher (logged when the stage starts).
    """

    part: str | None
    model: nn.Module
    teacher: nn.Module | None
    losses: Mapping[str, Any] | None
    role: str
    train_cfg: TrainConfig | None = None
    with_transfer: bool = False
    label: str = ""
    where: str = "scheme.params"
    teacher_name: str | None = None


def link_task(ctx: Context, link: Stage) -> FlowTask:
    """The offline stage of a link: its model taught by its (frozen) teacher through its losses."""
    objective = ctx.objective(link.losses if link.losses is not None else CE_ONLY, where=link.where)
    teacher = Frozen(link.teacher, link.teacher_name or "teacher") if link.teacher is not None else None
    return offline_task(link.model, objective, teacher, where=link.where)


def check_link(ctx: Context, link: Stage) -> None:
    """Fail before any training when a link's losses and teacher do not fit together.

    Raises:
        ConfigError: Losses that need a teacher on a link without one.
        TapError: Feature taps that name no module of the link's models.
    """
    link_task(ctx, link).release()


def run_chain(ctx: Context, seed: int, links: Sequence[Stage]) -> list[dict[str, Any]]:
    """Train ``links`` in order, each as one resumable stage.

    Args:
        ctx: The run's scheme context.
        seed: The seed (data order of every stage; models were built by the caller).
        links: The stages; the last one is the primary (the distilled student).

    Returns:
        The last link's entries first (its primary entry leads), then every earlier link's.
    """
    if not links:
        raise ConfigError("a chain needs at least one stage")
    for link in links:
        check_link(ctx, link)
    per_link: list[list[dict[str, Any]]] = []
    for link in links:
        task = link_task(ctx, link)  # built now: its teacher is frozen with the weights an earlier link trained
        stage = ctx.stage_name(seed, link.part)
        log.info("[%s] %s taught by %s", stage, link.role, link.teacher_name or "labels alone")
        per_link.append(
            ctx.train(
                stage,
                task,
                seed,
                role=link.role,
                train_cfg=link.train_cfg,
                with_transfer=link.with_transfer,
                label=link.label or None,
            )
        )
    return [entry for entries in reversed(per_link) for entry in entries]
