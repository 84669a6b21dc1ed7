"""Skew KL and skew reverse KL between teacher and student next-token distributions (DistiLLM).

Ko, Kim, Chen & Yun, "DistiLLM: Towards Streamlined Distillation for Large Language Models",
ICML 2024, the alpha-skew KL and alpha-skew reverse KL of its Sec. 3, with ``p`` the teacher,
``q`` the student and skew ``alpha`` (here ``lam``)::

    skew KL          SKL(p, q)  = KL(p || lam p + (1 - lam) q)
    skew reverse KL  SRKL(p, q) = KL(q || lam q + (1 - lam) p)

Each KL is taken against a mixture that keeps ``lam`` of its own first argument, so it stays
finite where the other model puts no mass and is bounded: ``SKL <= log(1 / lam)`` and
``SRKL <= log(1 / lam)`` (``lam p + ... >= lam p``). ``lam = 0`` gives the plain forward KL
``KL(p_t || p_s)`` and reverse KL ``KL(p_s || p_t)``. Default ``lam = 0.1``: the authors' (jongwooko/distillm,
``--skew-alpha`` default 0.1; ``distillm/losses.py`` calls it ``lam``).

The authors' ``skewed_forward_kl`` drops the teacher's entropy (it minimises the cross-entropy
``-sum p log(mixture)``, the same gradient); here both are the true KLs, 0 for equal
distributions.

Per token, with ``p = softmax(z / T)`` for both models, averaged over the positions ``batch.y``
keeps (:mod:`darkknowledge.losses.tokens`); no ``T^2`` factor (DistiLLM: ``T = 1``). On sparse
teacher targets they are taken over the ``k + 1`` buckets (listed ids plus the rest).

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

LAM_RANGE = Range(low=0.05, high=0.5, log=True)  # brackets the paper's 0.1


def skew_forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, lam: float) -> torch.Tensor:
    """``KL(p_t || lam p_t + (1 - lam) p_s)`` per row.

    Args:
        s_logp: Student log-probabilities ``(n, m)``.
        t_logp: Teacher log-probabilities ``(n, m)``.
        lam: Skew in ``[0, 1)``; 0 is the forward KL ``KL(p_t || p_s)``.

    Returns:
        ``(n,)``, in ``[0, log(1 / lam)]``.
    """
    mix = s_logp if lam == 0.0 else log_mixture(t_logp, s_logp, lam)  # (n, m)
    return kl_rows(t_logp, mix)  # (n,)


def skew_reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, lam: float) -> torch.Tensor:
    """``KL(p_s || lam p_s + (1 - lam) p_t)`` per row.

    Args:
        s_logp: Student log-probabilities ``(n, m)``.
        t_logp: Teacher log-probabilities ``(n, m)``.
        lam: Skew in ``[0, 1)``; 0 is the reverse KL ``KL(p_s || p_t)``.

    Returns:
        ``(n,)``, in ``[0, log(1 / lam)]``.
    """
    mix = t_logp if lam == 0.0 else log_mixture(s_logp, t_logp, lam)  # (n, m)
    return kl_rows(s_logp, mix)  # (n,)


CITATION = "Ko, Kim, Chen, Yun. DistiLLM: Towards Streamlined Distillation for Large Language Models. ICML 2024."


SEARCH_SPACE = {"lam": LAM_RANGE, "weight": Range(low=0.1, high=10.0, log=True)}
"""What ``dk tune`` searches for either skew divergence."""


class _SkewKL(TokenDivergence):
    """The parameters both skew divergences share (``lam``, ``T``, ``chunk_size``)."""

    citation = CITATION

    def __init__(
        self,
        lam: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1,
        T: Annotated[float, Field(gt=0.0)] = 1.0,
        chunk_size: Annotated[int, Field(ge=0)] | Literal["auto"] | None = DEFAULT_CHUNK,
    ) -> None:
        super().__init__(T=T, chunk_size=chunk_size)
        self.lam = lam


@register_loss("skew_fkl")
class SkewForwardKL(_SkewKL):
    """DistiLLM's skew KL ``KL(p_t || lam p_t + (1 - lam) p_s)``, mean over kept positions.

    Args:
        lam: Skew (the paper's alpha) in ``[0, 1)``; 0 is the plain forward KL.
        T: Temperature dividing both models' logits (DistiLLM: 1).
        chunk_size: Tokens per chunk (None or 0: unchunked; ``auto``: by vocabulary, see ``chunk_rows``).
    """

    search_space: ClassVar[dict[str, Range]] = SEARCH_SPACE

    def divergence(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        return skew_forward_kl(s_logp, t_logp, self.lam)


@register_loss("skew_rkl")
class SkewReverseKL(_SkewKL):
    """DistiLLM's skew reverse KL ``KL(p_s || lam p_s + (1 - lam) p_t)``, mean over kept positions.

    Args:
        lam: Skew (the paper's alpha) in ``[0, 1)``; 0 is the plain reverse KL.
        T: Temperature dividing both models' logits (DistiLLM: 1).
        chunk_size: Tokens per chunk (None or 0: unchunked; ``auto``: by vocabulary, see ``chunk_rows``).
    """

    search_space: ClassVar[dict[str, Range]] = SEARCH_SPACE

    def divergence(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        return skew_reverse_kl(s_logp, t_logp, self.lam)
