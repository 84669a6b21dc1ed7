"""Reverse KL between the student's and the teacher's next-token distributions.

Gu, Dong, Wei & Huang, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024,
Sec. 2.1: the student minimises the reverse KL ``KL(q_theta || p)`` to the teacher, which is
mode-seeking (the student is not pushed to cover the teacher's low-probability regions). MiniLLM
optimises the sequence-level reverse KL with a policy gradient on its own samples; this term is
its token-level form on given positions, as GKD uses it (Agarwal et al., "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024, Sec. 2; the
``beta = 1`` endpoint of TRL's ``GKDTrainer.generalized_jsd_loss``). Per token::

    RKL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v))

with ``p = softmax(z / T)`` for both models, averaged over the positions ``batch.y`` keeps
(:mod:`darkknowledge.losses.tokens`); no ``T^2`` factor. On sparse teacher targets it is the
reverse KL between the ``k + 1`` buckets (listed ids plus the rest of the vocabulary).

Shapes: student logits ``(..., V)`` or LazyLogits, teacher logits/LazyLogits/sparse targets over
the same positions, ``batch.y`` one entry per position (``-1``: ignored).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from darkknowledge.losses import register_loss
from darkknowledge.losses.tokens import TokenDivergence, kl_rows
from darkknowledge.search_space import Range


def reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """``sum_v p_s (log p_s - log p_t)`` per row.

    Args:
        s_logp: Student log-probabilities ``(n, m)``.
        t_logp: Teacher log-probabilities ``(n, m)``.

    Returns:
        ``(n,)``, >= 0.
    """
    return kl_rows(s_logp, t_logp)  # (n,)


@register_loss("rkl")
class ReverseKL(TokenDivergence):
    """Token-level reverse KL ``KL(p_s || p_t)`` (MiniLLM's objective per token), mean over kept positions.

    Args:
        T: Temperature dividing both models' logits (LM papers: 1).
        chunk_size: Tokens per chunk (None or 0: unchunked; ``auto``: by vocabulary, see ``chunk_rows``).
    """

    citation = "Gu, Dong, Wei, Huang. MiniLLM: Knowledge Distillation of Large Language Models. ICLR 2024."
    search_space: ClassVar[dict[str, Range]] = {
        "weight": Range(low=0.1, high=10.0, log=True),  # the term's scale against ce
        "T": Range(low=0.5, high=2.0, log=True),  # a band around the papers' T = 1
    }

    def divergence(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        return reverse_kl(s_logp, t_logp)
