"""Total variation distance between teacher and student next-token distributions.

Wen, Li, Du & Mou, "f-Divergence Minimization for Sequence-Level Knowledge Distillation",
ACL 2023 (f-DISTILL): one of the f-divergences it distils language models with is the total
variation distance, computed as a sum of step-wise (token-level) TVDs. Per token::

    TV(p_t, p_s) = 0.5 * sum_v |p_t(v) - p_s(v)|

symmetric and in ``[0, 1]``; with ``p = softmax(z / T)`` for both models, averaged over the
positions ``batch.y`` keeps (:mod:`darkknowledge.losses.tokens`); no ``T^2`` factor. On sparse
teacher targets it is taken over the ``k + 1`` buckets (listed ids plus the rest of the
vocabulary), a lower bound of the full TV.

Shapes: student logits ``(..., V)`` or LazyLogits, teacher logits/LazyLogits/sparse targets over
the same positions, ``batch.y`` one entry per position (``-1``: ignored).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from darkknowledge.losses import register_loss
from darkknowledge.losses.tokens import TokenDivergence
from darkknowledge.search_space import Range


def total_variation(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum_v |p_t - p_s|`` per row.

    Args:
        s_logp: Student log-probabilities ``(n, m)``.
        t_logp: Teacher log-probabilities ``(n, m)``.

    Returns:
        ``(n,)``, in ``[0, 1]``.
    """
    return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(dim=-1)  # (n,)


@register_loss("tv")
class TotalVariation(TokenDivergence):
    """Token-level total variation ``0.5 * sum_v |p_t - p_s|``, mean over kept positions.

    Args:
        T: Temperature dividing both models' logits (f-DISTILL: 1).
        chunk_size: Tokens per chunk (None or 0: unchunked; ``auto``: by vocabulary, see ``chunk_rows``).
    """

    citation = "Wen, Li, Du, Mou. f-Divergence Minimization for Sequence-Level Knowledge Distillation. ACL 2023."
    search_space: ClassVar[dict[str, Range]] = {
        "weight": Range(low=0.1, high=10.0, log=True),  # the term's scale against ce
        "T": Range(low=0.5, high=2.0, log=True),  # a band around T = 1
    }

    def divergence(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        return total_variation(s_logp, t_logp)
