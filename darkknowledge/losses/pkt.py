"""Probabilistic Knowledge Transfer (PKT): match the batch's conditional similarity distributions.

Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
ECCV 2018 (arXiv:1803.10837), Sec. 3, with the cosine-similarity kernel of Eq. 13.

Each side (student, teacher) builds its own kernel over the ``B`` samples of the batch, so
their feature dimensions may differ (no adapter)::

    K(i, j) = ( cos(f_i, f_j) + 1 ) / 2                       in [0, 1], (B, B)
    p_{j|i} = K_t(i, j) / sum_k K_t(i, k)   (teacher),  q_{j|i} likewise for the student
    L = 1/B^2 * sum_{i,j} p_{j|i} * log( (p_{j|i} + eps) / (q_{j|i} + eps) )

The paper writes ``L = sum_{i,j} p_{j|i} log(p_{j|i} / q_{j|i})`` (a KL per row, summed over
rows); the authors' code (passalis/probabilistic_kt, also HobbitLong/RepDistiller
``distiller_zoo/PKT.py``: ``cosine_similarity_loss``) averages the ``B^2`` entries instead
(= the paper's sum / ``B^2``) and adds ``eps = 1e-7`` inside the log, which is what is
implemented. The diagonal ``i = j`` is kept, as in the authors' code. Each feature is
L2-normalized first (``f / (||f|| + eps)``; an all-zero feature becomes 0, not NaN).

Defaults: the penultimate feature (the classifier's input), as in RepDistiller; feature maps
are flattened to vectors ``(B, C * prod(S))``. RepDistiller's CIFAR-100 objective is
``CE + 30000 * PKT`` (no KD term): set ``weight: 30000`` on the term. Several tap pairs are
summed.

The loss is invariant to a positive rescaling of each sample's feature (cosine kernel) and is
0 (up to ``eps``) when student and teacher features are equal.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.feature import FeatureLoss
from darkknowledge.search_space import Range


def cosine_conditional(f: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Row-stochastic matrix ``p_{j|i}`` from the cosine kernel ``(cos + 1) / 2``.

    Args:
        f: Features ``(B, D)``.
        eps: Added to the norms (an all-zero feature gets similarity 0 with everything).

    Returns:
        ``(B, B)``; each row sums to 1.
    """
    f = f / (f.norm(dim=1, keepdim=True) + eps)  # (B, D) unit rows (0 for a zero feature)
    k = (f @ f.t() + 1.0) / 2.0  # (B, B) in [0, 1]
    return k / k.sum(dim=1, keepdim=True)  # (B, B) rows sum to 1


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PKT for one pair: ``mean_{i,j} p_{j|i} log((p_{j|i} + eps) / (q_{j|i} + eps))``.

    Args:
        f_s: Student features ``(B, D_s)`` or ``(B, C, *S)`` (flattened).
        f_t: Teacher features ``(B, D_t)`` or ``(B, C, *S)``; a constant.
        eps: Numerical constant of the authors' code (1e-7).

    Returns:
        Scalar >= 0 (up to eps); 0 when the features are equal.
    """
    dtype = torch.promote_types(f_s.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
    q = cosine_conditional(f_s.flatten(1).to(dtype), eps)  # (B, B) student
    p = cosine_conditional(f_t.flatten(1).to(dtype), eps)  # (B, B) teacher
    return (p * torch.log((p + eps) / (q + eps))).mean()


@register_loss("pkt")
class PKT(FeatureLoss):
    """Probabilistic knowledge transfer: KL between the batch's cosine-kernel conditionals.

    Shapes: each tap is ``(B, D)`` or a feature map (flattened); student and teacher dims may
    differ (a kernel per side). Default tap: the penultimate feature. Needs a batch of at
    least 2 samples. Set the paper/RepDistiller scale as the term's ``weight`` (30000).

    Args:
        eps: Constant in the norms and the log ratio (authors' code: 1e-7).
        student_taps: Student module paths (default: ``fc:input``).
        teacher_taps: Teacher module paths, one per student path.
    """

    knowledge = "relation"
    citation = "Passalis, Tefas. Learning Deep Representations with Probabilistic Knowledge Transfer. ECCV 2018."
    default_taps = "penultimate"
    search_space = {
        "weight": Range(low=3000.0, high=100000.0, log=True),  # RepDistiller: 30000
    }

    def __init__(
        self,
        eps: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-7,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.eps = eps

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        for (sp, tp), f_s, f_t in zip(self.pairs, self.student_features(student), self.teacher_features(teacher)):
            if f_s.shape[0] != f_t.shape[0]:
                raise ShapeError(
                    f"losses.pkt: student tap {sp!r} {tuple(f_s.shape)} and teacher tap {tp!r} "
                    f"{tuple(f_t.shape)} have different batch sizes"
                )

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        losses = [
            pkt_loss(s, t, self.eps) for s, t in zip(self.student_features(student), self.teacher_features(teacher))
        ]
        return torch.stack(losses).sum()
