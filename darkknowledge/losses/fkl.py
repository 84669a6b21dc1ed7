"""Forward KL between the teacher's and the student's next-token distributions.

The token-level objective of word-level KD for sequence models (Kim & Rush, "Sequence-Level
Knowledge Distillation", EMNLP 2016, Sec. 3.1, at T = 1) and the forward-KL baseline of the LM
distillation papers (Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models",
ICLR 2024; Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", ICLR 2024 (GKD), Sec. 2). Per token::

    FKL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))

with ``p = softmax(z / T)`` for both models, averaged over the positions ``batch.y`` keeps
(:mod:`darkknowledge.losses.tokens`); no ``T^2`` factor (the papers train at ``T = 1``).
Mass-covering: the student pays wherever the teacher puts mass.

On sampled sparse targets (ids drawn from ``p_t`` with replacement, ``w_i`` = draw count /
draws) the loss is the unbiased estimator of Anshumann et al., "Sparse Logit Sampling:
Accelerating Knowledge Distillation in LLMs", ACL 2025::

    sum_i w_i (log p_t(id_i) - log p_s(id_i)),   E[.] = FKL(p_t || p_s)

whose gradient is unbiased too; on top-k targets it is the KL between the ``k + 1`` buckets.

Shapes: student logits ``(..., V)`` or LazyLogits, teacher logits/LazyLogits/sparse targets over
the same positions, ``batch.y`` one entry per position (``-1``: ignored).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from darkknowledge.losses import register_loss
from darkknowledge.losses.tokens import SampledEstimator, TokenDivergence, kl_rows
from darkknowledge.search_space import Range


def forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """``sum_v p_t (log p_t - log p_s)`` per row.

    Args:
        s_logp: Student log-probabilities ``(n, m)``.
        t_logp: Teacher log-probabilities ``(n, m)``.

    Returns:
        ``(n,)``, >= 0.
    """
    return kl_rows(t_logp, s_logp)  # (n,)


def sampled_forward_kl(
    s_logp: torch.Tensor, t_logp: torch.Tensor, weights: torch.Tensor, used: torch.Tensor
) -> torch.Tensor:
    """``sum_i w_i (log p_t(id_i) - log p_s(id_i))`` per row (Anshumann et al. 2025).

    Args:
        s_logp: Student log-probabilities of the drawn ids ``(n, k)``.
        t_logp: Teacher log-probabilities of the drawn ids ``(n, k)`` (``-inf`` in unused slots).
        weights: Draw counts / draws ``(n, k)`` (0 in unused slots).
        used: Slots holding a drawn id ``(n, k)``.

    Returns:
        ``(n,)``: an unbiased estimate of ``KL(p_t || p_s)`` per row (may be negative).
    """
    zero = torch.zeros((), dtype=s_logp.dtype, device=s_logp.device)
    gap = torch.where(used, t_logp, zero) - torch.where(used, s_logp, zero)  # (n, k); 0 in unused slots
    return (weights * gap).sum(dim=-1)  # (n,)


@register_loss("fkl")
class ForwardKL(TokenDivergence):
    """Token-level forward KL ``KL(p_t || p_s)``, mean over kept positions.

    Args:
        T: Temperature dividing both models' logits (LM papers: 1).
        chunk_size: Tokens per chunk (None or 0: unchunked; ``auto``: by vocabulary, see ``chunk_rows``).
    """

    citation = (
        "Kim, Rush. Sequence-Level Knowledge Distillation. EMNLP 2016 (word-level KD); "
        "Anshumann et al. Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs. ACL 2025."
    )
    search_space: ClassVar[dict[str, Range]] = {
        "weight": Range(low=0.1, high=10.0, log=True),  # the term's scale against ce
        "T": Range(low=0.5, high=2.0, log=True),  # a band around the papers' T = 1
    }

    def divergence(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        return forward_kl(s_logp, t_logp)

    def sampled_estimator(self) -> SampledEstimator | None:
        return sampled_forward_kl
