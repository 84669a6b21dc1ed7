"""Deep mutual learning: a cohort of peers, each taught by the others' predictions.

Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018. For two networks
(Eq. 4-5)::

    L_theta1 = L_C1 + D_KL(p2 || p1)        L_theta2 = L_C2 + D_KL(p1 || p2)

and for a cohort of ``K`` networks (Sec. 3.3)::

    L_thetak = L_Ck + 1/(K-1) * sum_{l != k} D_KL(p_l || p_k)

where ``L_Ck`` is peer ``k``'s cross-entropy and ``p_l`` the other peers' predictions,
constants for peer ``k``'s update. Here ``D_KL`` is :func:`~darkknowledge.losses.kd.kd_soft_loss`
(``T^2 KL`` at temperature ``T``; DML uses ``T = 1``) scaled by ``weight``.

Implementation: one module holds every peer; its forward computes each peer's logits once
and returns ``sum_k L_thetak`` with the others' logits detached, so each peer receives exactly
its own gradient and keeps its own optimizer state (see :mod:`darkknowledge.schemes.cohort`).
The paper updates the peers in turn within a step (Algorithm 1); here they step
simultaneously on the same predictions, the usual implementation for ``K > 2``. Unlabelled
transfer samples (``y == -1``) contribute to the KL terms only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.schemes import register_scheme
from darkknowledge.schemes.cohort import (
    CohortScheme,
    build_peers,
    burn_in_factor,
    cohort_ce,
    peer_kl,
)

if TYPE_CHECKING:
    from darkknowledge.schemes.context import SchemeContext


class MutualCohort(nn.Module):
    """Every peer plus the DML objective: ``sum_k CE_k + weight * KL_k`` (others detached).

    Args:
        peers: ``N >= 2`` models with the same class count.
        T: Temperature of the KL terms.
        weight: Weight of the KL terms (DML: 1).
        burn_in: Epochs of cross-entropy alone before the KL terms start (DML: 0).
    """

    def __init__(self, peers: Sequence[nn.Module], T: float = 1.0, weight: float = 1.0, burn_in: float = 0.0) -> None:
        super().__init__()
        self.peers = nn.ModuleList(peers)
        self.T, self.weight, self.burn_in = T, weight, burn_in

    def forward(self, batch: Batch, teacher: Any = None,
                epoch_progress: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = [p(batch.x) for p in self.peers]  # N x (B, K)
        ce = torch.stack(cohort_ce(logits, batch.y)).sum()
        w = self.weight * burn_in_factor(epoch_progress, self.burn_in)
        if w == 0.0:  # before burn-in: no distillation term at all
            return ce, {"ce": ce.detach(), "kl": torch.zeros_like(ce).detach()}
        kl = torch.stack(peer_kl(logits, self.T)).sum()
        return ce + w * kl, {"ce": ce.detach(), "kl": kl.detach()}


@register_scheme("mutual")
class Mutual(CohortScheme):
    """Deep mutual learning (DML): ``N >= 2`` peers of any architectures teach each other.

    Args:
        peers: The cohort (peer 0 is the primary, exported model).
        T: Temperature of the KL terms.
        weight: Weight of each peer's KL term.
        burn_in: Epochs of cross-entropy alone before the KL terms start.
    """

    citation = "Zhang, Xiang, Hospedales, Lu. Deep Mutual Learning. CVPR 2018."
    summary = "a cohort of peers trained together, each with CE + KL towards the others' (detached) predictions"
    report_notes: ClassVar[tuple[str, ...]] = (
        (
            "mutual: every peer is trained with CE + KL to the other peers' predictions in one simultaneous step; "
            "'student' is peer 0 (same initialisation as the baseline), 'ensemble' averages the peers' probabilities"
        ),
    )

    def __init__(self, peers: Sequence[nn.Module], T: float = 1.0, weight: float = 1.0, burn_in: float = 0.0) -> None:
        self._module = MutualCohort(peers, T, weight, burn_in)
        self._init_ensemble()

    @classmethod
    def build(
        cls,
        ctx: SchemeContext,
        seed: int,
        peers: list[dict[str, Any]] | None = None,
        n: Annotated[int, Field(ge=2)] | None = None,
        T: Annotated[float, Field(gt=0.0)] = 1.0,
        weight: Annotated[float, Field(ge=0.0)] = 1.0,
        burn_in: Annotated[float, Field(ge=0.0)] = 0.0,
    ) -> Mutual:
        """The cohort of ``seed``.

        Args:
            ctx: The run's context.
            seed: Run seed (peer 0 gets the baseline's initialisation).
            peers: Model specs ``{name, params}`` (default: ``n`` copies of the recipe's student).
            n: Number of peers (default 2, or ``len(peers)``).
            T: Softmax temperature of the KL terms (paper: 1).
            weight: Weight of each peer's KL term (paper: 1).
            burn_in: Epochs of cross-entropy alone before mutual learning starts (paper: 0).
        """
        return cls(build_peers(ctx, seed, peers, n), T=T, weight=weight, burn_in=burn_in)
