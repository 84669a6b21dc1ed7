"""KDCL: online distillation from an ensemble teacher built from the peers' logits.

Guo, Wang, Wu, Yan, Liang, Hu & Luo, "Online Knowledge Distillation via Collaborative
Learning", CVPR 2020. ``m`` peers are trained together; each step their logits are combined
into a soft target ``z_t`` that teaches every peer (Sec. 3)::

    L = sum_i [ CE(z_i, y) + weight * T^2 * KL( softmax(z_t / T) || softmax(z_i / T) ) ]

``z_t`` is a constant (computed from detached logits): the ensemble is a target, not a path
between peers. Ensembling variants (``ensemble``):

* ``min_logit`` (KDCL-MinLogit): subtract the ground-truth class logit from each peer's
  logits, ``zbar_i = z_i - z_{i,c}``, then take the element-wise minimum over the peers,
  ``z_t,j = min_i zbar_{i,j}``: for every class the peer most confident in ``c`` against it.
* ``naive`` (KDCL-Naive): per sample, the logits of the peer with the lowest cross-entropy.
* ``mean``: the plain average of the peers' logits (the simple baseline the paper improves on).

``min_logit`` and ``naive`` need the label; unlabelled transfer samples (``y == -1``) fall
back to the mean of the logits. KDCL's per-peer input augmentation and its
``Linear``/``General`` (validation-weighted) variants are not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.schemes import register_scheme
from darkknowledge.schemes.cohort import (
    CohortScheme,
    build_peers,
    burn_in_factor,
    cohort_ce,
)

if TYPE_CHECKING:
    from darkknowledge.schemes.context import SchemeContext

EnsembleName = Literal["min_logit", "naive", "mean"]
ENSEMBLES = ("min_logit", "naive", "mean")


def min_logit_teacher(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KDCL-MinLogit: ``z_t,j = min_i (z_{i,j} - z_{i,y})``.

    Args:
        logits: ``(N, B, K)`` stacked peer logits.
        y: ``(B,)`` labels (all labelled).

    Returns:
        ``(B, K)``; the ground-truth entry is 0 and every other entry is the smallest margin
        of any peer, so the target's true-class probability is at least every peer's.
    """
    index = y.view(1, -1, 1).expand(logits.shape[0], -1, 1)  # (N, B, 1)
    shifted = logits - logits.gather(-1, index)  # (N, B, K)
    return shifted.min(dim=0).values  # (B, K)


def naive_teacher(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KDCL-Naive: per sample, the logits of the peer with the lowest cross-entropy.

    Args:
        logits: ``(N, B, K)``.
        y: ``(B,)`` labels (all labelled).

    Returns:
        ``(B, K)``.
    """
    n, b, k = logits.shape
    ce = F.cross_entropy(logits.reshape(n * b, k), y.repeat(n), reduction="none").view(n, b)  # (N, B)
    best = ce.argmin(dim=0)  # (B,)
    return logits[best, torch.arange(b, device=logits.device)]  # (B, K)


def ensemble_teacher(logits: Sequence[torch.Tensor], y: torch.Tensor, kind: str = "min_logit") -> torch.Tensor:
    """The detached ensemble target of KDCL from the peers' logits.

    Args:
        logits: ``N`` tensors ``(B, K)``.
        y: ``(B,)`` labels; ``-1`` (unlabelled) samples get the mean of the logits.
        kind: ``min_logit``, ``naive`` or ``mean``.

    Returns:
        ``(B, K)``, without a gradient path.
    """
    if kind not in ENSEMBLES:
        raise ConfigError(f"kdcl ensemble {kind!r} is unknown; valid: {', '.join(ENSEMBLES)}")
    with torch.no_grad():
        z = torch.stack([t.detach().float() for t in logits])  # (N, B, K)
        teacher = z.mean(dim=0)  # (B, K)
        if kind == "mean":
            return teacher
        labelled = y != UNLABELED  # (B,)
        if bool(labelled.any()):
            fn = min_logit_teacher if kind == "min_logit" else naive_teacher
            teacher[labelled] = fn(z[:, labelled], y[labelled])
        return teacher


class KDCLCohort(nn.Module):
    """The peers plus KDCL's objective: ``sum_i CE_i + weight * T^2 KL(p_t^T || p_i^T)``.

    Args:
        peers: ``N >= 2`` models.
        ensemble: How the teacher logits are built (``min_logit``, ``naive``, ``mean``).
        T: Temperature.
        weight: Weight of the distillation term.
        burn_in: Epochs of cross-entropy alone before distillation starts.
    """

    def __init__(self, peers: Sequence[nn.Module], ensemble: str = "min_logit", T: float = 2.0,
                 weight: float = 1.0, burn_in: float = 0.0) -> None:
        super().__init__()
        if ensemble not in ENSEMBLES:
            raise ConfigError(f"kdcl ensemble {ensemble!r} is unknown; valid: {', '.join(ENSEMBLES)}")
        self.peers = nn.ModuleList(peers)
        self.ensemble, self.T, self.weight, self.burn_in = ensemble, T, weight, burn_in

    def forward(self, batch: Batch, teacher: Any = None,
                epoch_progress: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = [p(batch.x) for p in self.peers]  # N x (B, K)
        ce = torch.stack(cohort_ce(logits, batch.y)).sum()
        w = self.weight * burn_in_factor(epoch_progress, self.burn_in)
        if w == 0.0:
            return ce, {"ce": ce.detach(), "kl": torch.zeros_like(ce).detach()}
        target = ensemble_teacher(logits, batch.y, self.ensemble)  # (B, K), constant
        kl = torch.stack([kd_soft_loss(z, target, self.T) for z in logits]).sum()
        return ce + w * kl, {"ce": ce.detach(), "kl": kl.detach()}


@register_scheme("kdcl")
class KDCL(CohortScheme):
    """KDCL: peers distil from an ensemble of their own logits (detached).

    Args:
        peers: The cohort (peer 0 is the primary, exported model).
        ensemble: ``min_logit`` (paper's best on CIFAR), ``naive`` or ``mean``.
        T: Temperature of the KL term.
        weight: Weight of the KL term.
        burn_in: Epochs of cross-entropy alone before distillation starts.
    """

    citation = "Guo et al. Online Knowledge Distillation via Collaborative Learning (KDCL). CVPR 2020."
    summary = "peers trained together; an ensemble of their detached logits (MinLogit/naive/mean) teaches each peer"
    report_notes: ClassVar[tuple[str, ...]] = (
        (
            "kdcl: each step the peers' logits form a detached ensemble target that teaches every peer; "
            "'student' is peer 0 (same initialisation as the baseline), 'ensemble' averages the peers' probabilities"
        ),
    )

    def __init__(self, peers: Sequence[nn.Module], ensemble: str = "min_logit", T: float = 2.0,
                 weight: float = 1.0, burn_in: float = 0.0) -> None:
        self._module = KDCLCohort(peers, ensemble, T, weight, burn_in)
        self._init_ensemble()

    @classmethod
    def build(
        cls,
        ctx: SchemeContext,
        seed: int,
        peers: list[dict[str, Any]] | None = None,
        n: Annotated[int, Field(ge=2)] | None = None,
        ensemble: EnsembleName = "min_logit",
        T: Annotated[float, Field(gt=0.0)] = 2.0,
        weight: Annotated[float, Field(ge=0.0)] = 1.0,
        burn_in: Annotated[float, Field(ge=0.0)] = 0.0,
    ) -> KDCL:
        """The cohort of ``seed``.

        Args:
            ctx: The run's context.
            seed: Run seed (peer 0 gets the baseline's initialisation).
            peers: Model specs ``{name, params}`` (default: ``n`` copies of the recipe's student).
            n: Number of peers (default 2, or ``len(peers)``).
            ensemble: Teacher construction: ``min_logit``, ``naive`` or ``mean``.
            T: Softmax temperature.
            weight: Weight of the distillation term.
            burn_in: Epochs of cross-entropy alone before distillation starts.
        """
        return cls(build_peers(ctx, seed, peers, n), ensemble=ensemble, T=T, weight=weight, burn_in=burn_in)

