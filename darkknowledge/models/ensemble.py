"""An evaluation-only ensemble: the log of the mean of its members' softmax probabilities.

Used for the report rows of trained cohorts (mutual learning's and KDCL's peers) and of
born-again generations (BANE, Furlanello et al., ICML 2018, Sec. 3.1:
``f(x) = 1/k sum_i softmax(f(x, theta_i))``). It only references its members: keep it out of
a trainable module, so an optimizer never sees their parameters twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def mean_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of the members' softmax probabilities, ``(B, K)``."""
    return torch.stack([F.softmax(z.float(), dim=-1) for z in logits]).mean(dim=0)  # (N, B, K) -> (B, K)


class ProbabilityEnsemble(nn.Module):
    """``log(mean_i softmax(m_i(x)))`` ``(B, K)``: its argmax is the averaged prediction and its
    cross-entropy the ensemble's negative log-likelihood.

    Args:
        members: The models to average (same class count).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = mean_probs([m(x) for m in self.members])  # (B, K)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
