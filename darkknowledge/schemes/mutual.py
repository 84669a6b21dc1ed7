"""Deep mutual learning: a cohort of peers, each taught by the others' predictions.

Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018. For two networks
(Eq. 4-5)::

    L_theta1 = L_C1 + D_KL(p2 || p1)        L_theta2 = L_C2 + D_KL(p1 || p2)

and for a cohort of ``K`` networks (Sec. 3.3)::

    L_thetak = L_Ck + 1/(K-1) * sum_{l != k} D_KL(p_l || p_k)

with the other peers' predictions ``p_l`` constants for peer ``k``'s update.

Plan: every peer is a view; each other peer, detached, is one of its teachers
(:class:`~darkknowledge.teachers.peers.Peer`), and the recipe's ``losses`` are what it learns:
the terms that read no teacher (``ce`` = ``L_Ck``) once, the terms that read one (the paper's
``D_KL`` is ``kd: {T: 1, alpha: 1}``) averaged over its teachers. Any loss works: DKD, DIST,
feature losses (one set of adapters per pair of peers), relation losses. Unlabelled transfer
samples (``y == -1``) count in the teacher terms only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from darkknowledge.models.ensemble import ProbabilityEnsemble
from darkknowledge.schemes.base import Scheme, register_scheme
from darkknowledge.schemes.cohort import COHORT_MOVED, CohortParams, build_peers, peer_names, view_suffix
from darkknowledge.schemes.task import FlowTask
from darkknowledge.schemes.wiring import require_teacher_terms, taught
from darkknowledge.teachers.flow import Flow
from darkknowledge.teachers.peers import Peer

if TYPE_CHECKING:
    from torch import nn

    from darkknowledge.schemes.context import Context


def mutual_task(ctx: Context, peers: list[nn.Module], names: list[str], ensemble: bool = True) -> FlowTask:
    """Every peer taught by every other peer (detached), the recipe's ``losses`` averaged over them."""
    require_teacher_terms(ctx.objective(), ctx.cfg.scheme.name)
    teachers = [Peer(name, model) for name, model in zip(names, peers)]
    links = []
    for k, name in enumerate(names):
        others = [t for j, t in enumerate(teachers) if j != k]
        links += taught(name, ctx.objective, others, mode="mean", suffix=view_suffix(name))
    flow = Flow(dict(zip(names, peers)), links)
    evaluate = dict(zip(names, peers))
    if ensemble:
        evaluate["ensemble"] = ProbabilityEnsemble(peers)
    return FlowTask(flow, evaluate)


@register_scheme("mutual")
class Mutual(Scheme):
    """Deep mutual learning (DML): ``N >= 2`` peers of any architectures teach each other."""

    citation = "Zhang, Xiang, Hospedales, Lu. Deep Mutual Learning. CVPR 2018."
    summary = "a cohort of peers trained together, each learning the losses from the others' (detached) predictions"
    report_notes: ClassVar[tuple[str, ...]] = (
        (
            "mutual: every peer learns the recipe's losses from the other peers' predictions in one simultaneous "
            "step; 'student' is peer 0 (same initialisation as the baseline), 'ensemble' averages the peers' "
            "probabilities"
        ),
    )
    example: ClassVar[dict[str, Any]] = {"teacher": None}
    Params = CohortParams
    moved = COHORT_MOVED

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> FlowTask:
        """The cohort of ``seed`` (peer 0 with the baseline's initialisation)."""
        peers = build_peers(ctx, seed, params.peers, params.n)
        return mutual_task(ctx, peers, peer_names(len(peers)))
