"""KDCL's online ensemble teacher: the peers' logits of this step combined into one target.

Guo, Wang, Wu, Yan, Liang, Hu & Luo, "Online Knowledge Distillation via Collaborative
Learning", CVPR 2020 (Sec. 3). The peers' logits ``z_i`` of the step are combined into a soft
target ``z_t`` that teaches every peer; it is a constant (computed from detached logits):

* ``min_logit`` (KDCL-MinLogit): subtract the ground-truth class logit from each peer's
  logits, ``zbar_i = z_i - z_{i,c}``, then take the element-wise minimum over the peers,
  ``z_t,j = min_i zbar_{i,j}``: for every class the peer most confident in ``c`` against it.
* ``naive`` (KDCL-Naive): per sample, the logits of the peer with the lowest cross-entropy.
* ``mean``: the plain average of the peers' logits (the simple baseline the paper improves on).

``min_logit`` and ``naive`` need the label; unlabelled samples (``y == -1``) fall back to the
mean. The ensemble's features (for feature and relation losses, which the paper does not
combine with KDCL) are the mean of the peers' detached features at the same tap paths, so the
peers must give them in one shape (peers of one architecture).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses.base import Outputs, class_logits
from darkknowledge.teachers.base import Teacher, Views

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


def mean_features(values: Sequence[torch.Tensor], path: str, names: Sequence[str]) -> torch.Tensor:
    """The mean of the members' (detached) features at ``path``; one shape required."""
    shapes = [tuple(v.shape) for v in values]
    if len(set(shapes)) != 1:
        listed = ", ".join(f"{n}: {s}" for n, s in zip(names, shapes))
        raise ShapeError(
            f"the ensemble teacher averages its members' features at {path!r}, but they differ in "
            f"shape ({listed}); use members of one architecture, or logit losses"
        )
    return torch.stack([v.detach() for v in values]).mean(dim=0)


class Ensemble(Teacher):
    """KDCL's ensemble of the trainable views ``views`` (their logits combined by ``kind``).

    Args:
        views: The members' view names (the peers).
        model: The module whose paths the teacher taps name (a member's model).
        kind: ``min_logit``, ``naive`` or ``mean``.
    """

    def __init__(self, views: Sequence[str], model: nn.Module | None, kind: str = "min_logit") -> None:
        super().__init__()
        if kind not in ENSEMBLES:
            raise ConfigError(f"kdcl ensemble {kind!r} is unknown; valid: {', '.join(ENSEMBLES)}")
        self.member_views, self.model, self.kind_name = list(views), model, kind
        self.name = "ensemble"

    @property
    def kind(self) -> str:
        return f"the {self.kind_name} ensemble of {self.member_views}"

    def view_taps(self) -> dict[str, tuple[str, ...]]:
        return dict.fromkeys(self.member_views, self.taps)

    def __call__(self, batch: Batch, views: Views | None = None) -> Outputs:
        assert views is not None
        outs = [views[v] for v in self.member_views]
        logits = (
            ensemble_teacher([class_logits(o, "the peers' ensemble") for o in outs], batch.y, self.kind_name)
            if self.need_logits
            else None
        )
        feats = {p: mean_features([o.feature(p) for o in outs], p, self.member_views) for p in self.taps}
        return Outputs(logits=logits, features=feats)
