"""KDCL: online distillation from an ensemble teacher built from the peers' logits.

Guo, Wang, Wu, Yan, Liang, Hu & Luo, "Online Knowledge Distillation via Collaborative
Learning", CVPR 2020. ``m`` peers are trained together; each step their logits are combined
into a soft target ``z_t`` that teaches every peer (Sec. 3)::

    L = sum_i [ CE(z_i, y) + T^2 * KL( softmax(z_t / T) || softmax(z_i / T) ) ]

``z_t`` is a constant, the :class:`~darkknowledge.teachers.ensemble.Ensemble` teacher
(``min_logit``, ``naive`` or ``mean``; see there). Plan: every peer is a view taught by that
one ensemble teacher through the recipe's ``losses`` (the paper's term is
``kd: {T: 2, alpha: 1}`` beside ``ce``). KDCL's per-peer input augmentation and its
``Linear``/``General`` (validation-weighted) variants are not implemented.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from darkknowledge.models.ensemble import ProbabilityEnsemble
from darkknowledge.schemes.base import Scheme, register_scheme
from darkknowledge.schemes.cohort import COHORT_MOVED, CohortParams, build_peers, peer_names, view_suffix
from darkknowledge.schemes.task import FlowTask
from darkknowledge.schemes.wiring import require_teacher_terms, taught
from darkknowledge.teachers.ensemble import Ensemble, EnsembleName
from darkknowledge.teachers.flow import Flow

if TYPE_CHECKING:
    from darkknowledge.schemes.context import Context


class KDCLParams(CohortParams):
    """``scheme.params`` of ``kdcl``."""

    ensemble: EnsembleName = "min_logit"


@register_scheme("kdcl")
class KDCL(Scheme):
    """KDCL: peers learn from an ensemble of their own logits (detached)."""

    citation = "Guo et al. Online Knowledge Distillation via Collaborative Learning (KDCL). CVPR 2020."
    summary = "peers trained together; an ensemble of their detached logits (MinLogit/naive/mean) teaches each peer"
    report_notes: ClassVar[tuple[str, ...]] = (
        (
            "kdcl: each step the peers' logits form a detached ensemble target that teaches every peer; "
            "'student' is peer 0 (same initialisation as the baseline), 'ensemble' averages the peers' probabilities"
        ),
    )
    example: ClassVar[dict[str, Any]] = {"teacher": None, "scheme": {"params": {"n": 3}}}
    Params = KDCLParams
    moved = COHORT_MOVED

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> FlowTask:
        """The cohort of ``seed``, each peer taught by the ensemble ``params.ensemble``."""
        require_teacher_terms(ctx.objective(), "kdcl")
        peers = build_peers(ctx, seed, params.peers, params.n)
        names = peer_names(len(peers))
        teacher = Ensemble(names, peers[0], kind=params.ensemble)
        links = [link for name in names for link in taught(name, ctx.objective, [teacher], suffix=view_suffix(name))]
        flow = Flow(dict(zip(names, peers)), links)
        return FlowTask(flow, {**dict(zip(names, peers)), "ensemble": ProbabilityEnsemble(peers)})
