"""The plan of a language-model student: one view (the causal LM), one teacher, one objective.

The student's step runs its decoder only and hands the losses hidden states and the output head
(:class:`~darkknowledge.lm.targets.LazyLogits`), so the token losses (``ce``, ``fkl``, ``rkl``,
``jsd``, ``skew_fkl``, ``skew_rkl``, ``tv``) compute logits a chunk of positions at a time and the
``(B, L, V)`` float32 logits never exist at once. Everything else is the one engine's: the
:class:`~darkknowledge.teachers.flow.Flow` holds the student and the objective (what the optimizer
sees, DDP wraps and a checkpoint holds); the teacher (live or cached,
:class:`~darkknowledge.teachers.lm_teacher.LMTeacher`) stays outside it; evaluation is the engine's
(next-token top-1 and mean cross-entropy over the held-out targets, so perplexity is ``exp(loss)``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from darkknowledge.lm.models import channels_first, lazy_logits
from darkknowledge.losses.base import Outputs
from darkknowledge.losses.objective import Objective
from darkknowledge.schemes.task import FlowTask
from darkknowledge.teachers.flow import Flow, Link
from darkknowledge.teachers.lm_teacher import LMTeacher


class LMFlow(Flow):
    """A flow whose views are causal LMs: a view's output is its lazy per-token distribution."""

    def run_view(self, view: str, x: Any) -> Outputs:
        taps = self.taps.get(view)
        if taps is not None:
            taps.active = True
        try:
            lazy = lazy_logits(self.view_model(view), x)  # hidden (B, L, d) + head
        finally:
            if taps is not None:
                taps.active = False
        feats = channels_first(taps.pop(), int(x.shape[1])) if taps is not None else {}  # (B, d, L) each
        return Outputs(logits=None, features=feats, tokens=lazy)


def lm_task(
    student: nn.Module, losses: dict[str, dict[str, Any] | None], teacher: LMTeacher | None, where: str = "losses"
) -> FlowTask:
    """The engine task that trains ``student`` by ``losses`` from ``teacher`` (None: the losses read none).

    Raises:
        ConfigError: A loss needs a teacher and there is none, or reads what the teacher cannot give.
    """
    objective = Objective.from_config(losses, where=where)
    reads = objective.teacher_terms()
    link = Link("student", objective, teacher if reads else None, where=where)
    flow = LMFlow({"student": student}, [link])
    return FlowTask(flow, {"student": student})
