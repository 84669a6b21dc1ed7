"""Generalized Jensen-Shannon divergence between teacher and student next-token distributions.

Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist & Bachem, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", ICLR 2024 (GKD), Eq. 1, with ``P`` the
teacher and ``Q`` the student::

    JSD(beta)(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M),   M = beta P + (1 - beta) Q

``beta`` weights the teacher, both in the mixture and on the teacher's KL term; ``beta = 0.5``
is the symmetric Jensen-Shannon divergence (at most ``log 2``). Taken literally the definition
is 0 at both ends (``M = Q`` at ``beta = 0``, ``M = P`` at ``beta = 1``); what tends to the KLs
is its scaled form: ``JSD(beta) / beta -> KL(P || Q)`` (forward) as ``beta -> 0`` and
``JSD(beta) / (1 - beta) -> KL(Q || P)`` (reverse) as ``beta -> 1``, which is why GKD (after
Huszár 2015) describes JSD(beta) as behaving like forward KL for small ``beta`` and like reverse
KL for ``beta`` near 1; the loss itself shrinks like ``beta`` (``1 - beta``) there. As in TRL's
``GKDTrainer.generalized_jsd_loss`` (huggingface/trl PR #3043), the endpoints are defined as the
KLs themselves: ``beta = 0`` is the forward KL ``KL(p_t || p_s)`` and ``beta = 1`` the reverse KL
``KL(p_s || p_t)``; the loss is therefore discontinuous at both ends. Default ``beta = 0.5``
(TRL's ``GKDConfig``); GKD's experiments use JSD(0.1), JSD(0.5) and JSD(0.9).

Per token, with ``p = softmax(z / T)`` for both models, averaged over the positions ``batch.y``
keeps (:mod:`darkknowledge.losses.tokens`); no ``T^2`` factor. On sparse teacher targets it is
taken over the ``k + 1`` buckets (listed ids plus the rest of the vocabulary).

Shapes: student logits ``(..., V)`` or LazyLogits, teacher logits/LazyLogits/sparse targets over
the same positions, ``batch.y`` one entry per position (``-1``: ignored).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field

from darkknowledge.losses import register_loss
from darkknowledge.losses.tokens import (
    DEFAULT_CHUNK,
    TokenDivergence,
    kl_rows,
    log_mixture,
)
from darkknowledge.search_space import Range


def generalized_jsd(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's ``JSD(beta)(p_t || p_s)`` per row; ``beta = 0``: ``KL(p_t || p_s)``, ``beta = 1``: ``KL(p_s || p_t)``.

    Args:
        s_logp: Student log-probabilities ``(n, m)``.
        t_logp: Teacher log-probabilities ``(n, m)``.
        beta: Weight of the teacher in ``[0, 1]``.

    Returns:
        ``(n,)``, >= 0.
    """
    if beta == 0.0:
        return kl_rows(t_logp, s_logp)  # forward KL (TRL's endpoint)
    if beta == 1.0:
        return kl_rows(s_logp, t_logp)  # reverse KL (TRL's endpoint)
    m_logp = log_mixture(t_logp, s_logp, beta)  # (n, m): log(beta p_t + (1 - beta) p_s)
    return beta * kl_rows(t_logp, m_logp) + (1.0 - beta) * kl_rows(s_logp, m_logp)  # (n,)


@register_loss("jsd")
class GeneralizedJSD(TokenDivergence):
    """GKD's generalized JSD ``beta KL(p_t || M) + (1 - beta) KL(p_s || M)``, ``M = beta p_t + (1 - beta) p_s``.

    Args:
        beta: Teacher weight in ``[0, 1]``; 0 is the forward KL, 1 the reverse KL (TRL's endpoints).
        T: Temperature dividing both models' logits (GKD: 1).
        chunk_size: Tokens per chunk (None or 0: unchunked; ``auto``: by vocabulary, see ``chunk_rows``).
    """

    citation = (
        "Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist, Bachem. On-Policy Distillation of Language "
        "Models: Learning from Self-Generated Mistakes. ICLR 2024."
    )
    search_space: ClassVar[dict[str, Range]] = {
        "beta": Range(low=0.1, high=0.9),  # GKD: JSD(0.1), JSD(0.5), JSD(0.9)
        "weight": Range(low=0.1, high=10.0, log=True),  # the term's scale against ce
    }

    def __init__(
        self,
        beta: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5,
        T: Annotated[float, Field(gt=0.0)] = 1.0,
        chunk_size: Annotated[int, Field(ge=0)] | Literal["auto"] | None = DEFAULT_CHUNK,
    ) -> None:
        super().__init__(T=T, chunk_size=chunk_size)
        self.beta = beta

    def divergence(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        return generalized_jsd(s_logp, t_logp, self.beta)
