"""Instance Relationship Graph (IRG): match instance features, their distances, and how those change.

Liu, Cao, Li, Yuan, Hu, Li & Duan, "Knowledge Distillation via Instance Relationship Graph",
CVPR 2019, Sec. 3 (Eqs. 1-9).

An IRG of a layer ``l`` over the ``B`` instances of a batch has the instance features as
vertices and their squared Euclidean distances as edges (Eq. 2)::

    A_l(i, j) = || f_l(x_i) - f_l(x_j) ||_2^2                        (B, B)

The authors' code divides each ``A`` by its largest entry (``normalization='max'`` in the
PyTorch port credited to yufanLIU/IRG), so student and teacher edges are comparable across
widths; written ``Â`` below. The IRG transformation between two layers ``l1 -> l2`` of the
same network has a vertex part ``Lambda(i) = ||f_l1(x_i) - f_l2(x_i)||^2`` (Eq. 4, needs
equal feature sizes at ``l1`` and ``l2``) and an edge part ``Theta = ||A_l1 - A_l2||^2``
(Eq. 5). The total loss (the paper's multi-type knowledge loss, Eq. 9, without its ``L_GT``
which is a separate ``ce`` term)::

    L = lambda_1 * mean_{i,k} (z_s[i,k] - z_t[i,k])^2                 vertex: logits
      + lambda_2 * sum_{layers incl. logits} mean_{i,j} (Â_s(i,j) - Â_t(i,j))^2      edges
      + lambda_3 * sum_{consecutive taps l -> l'} (Theta_s - Theta_t)^2   transformation

with ``Theta = mean_{i,j} (Â_l(i,j) - Â_l'(i,j))^2`` (``transform="edge"``, the default: it
works for any feature sizes), or with ``transform="vertex"`` the paper's vertex form
``mean_i (Λ_s(i) - Λ_t(i))^2`` where ``Λ`` is also divided by its max (our choice, for the
same reason as the edges; ``ShapeError`` unless ``l`` and ``l'`` have equal sizes on each
side). Squared norms are averaged (MSE) rather than summed, as in the PyTorch port.

Differences from the paper, stated: edges are matched per tap pair (plus the logits); the
paper's one-to-many mode (the teacher's last layer against several student layers) is
``teacher_taps`` repeating one path. The paper's ``lambda`` values were not checked here;
defaults are 1 for each (the port's ``w_graph = w_transform = 1``).

Default taps: the last stage and the penultimate feature of each model (two layers, so one
transformation). Features of any shape are flattened per sample; dims may differ between
student and teacher (distance matrices are ``B x B``), the logits must match in classes.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import Needs, Outputs, SetupInfo, check_logits_match, logits_pair
from darkknowledge.losses.feature import FeatureLoss, default_paths
from darkknowledge.search_space import Range


def edge_matrix(f: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Max-normalized squared Euclidean distances between the batch's instances.

    Args:
        f: Features ``(B, D)`` or ``(B, C, *S)`` (flattened per sample).
        eps: Added to the max (an all-equal batch gives zeros, not NaN).

    Returns:
        ``(B, B)`` in ``[0, 1]``, zero diagonal.
    """
    x = f.flatten(1)  # (B, D)
    sq = x.pow(2).sum(dim=1)  # (B,)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.t())).clamp(min=0.0)  # (B, B)
    d = d * (1.0 - torch.eye(len(x), dtype=d.dtype, device=d.device))  # (B, B) exact zero diagonal
    return d / (d.max() + eps)  # (B, B)


def vertex_transform(f1: torch.Tensor, f2: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``Λ(i) = ||f1_i - f2_i||^2`` divided by its max: ``(B, *)`` twice -> ``(B,)``."""
    a, b = f1.flatten(1), f2.flatten(1)  # (B, D), (B, D)
    if a.shape != b.shape:
        raise ShapeError(
            f"IRG vertex transformation needs two layers of equal size, got {tuple(f1.shape)} and "
            f"{tuple(f2.shape)}; use transform: edge"
        )
    lam = (a - b).pow(2).sum(dim=1)  # (B,)
    return lam / (lam.max() + eps)  # (B,)


def irg_loss(
    feats_s: list[torch.Tensor],
    feats_t: list[torch.Tensor],
    logits_s: torch.Tensor,
    logits_t: torch.Tensor,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    transform: str = "edge",
) -> torch.Tensor:
    """IRG loss: ``l1 * vertex(logits) + l2 * sum edges + l3 * sum transformations``.

    Args:
        feats_s: Student features per tap, shallow to deep.
        feats_t: Teacher features, one per student tap (constants).
        logits_s: Student logits ``(B, K)``.
        logits_t: Teacher logits ``(B, K)`` (constant).
        weights: ``(lambda_1, lambda_2, lambda_3)``.
        transform: ``"edge"`` (Theta) or ``"vertex"`` (Lambda).

    Returns:
        Scalar >= 0; 0 when student and teacher give the same features and logits.
    """
    dtype = torch.promote_types(logits_s.dtype, torch.float32)  # fp16/bf16 -> fp32
    feats_s = [f.to(dtype) for f in feats_s]
    feats_t = [f.to(dtype) for f in feats_t]
    z_s, z_t = logits_s.to(dtype), logits_t.to(dtype)  # (B, K) each
    vertex = (z_s - z_t).pow(2).mean()
    edges_s = [edge_matrix(f) for f in feats_s] + [edge_matrix(z_s)]  # (B, B) each
    edges_t = [edge_matrix(f) for f in feats_t] + [edge_matrix(z_t)]  # (B, B) each
    edge = torch.stack([(a - b).pow(2).mean() for a, b in zip(edges_s, edges_t)]).sum()
    trans = vertex.new_zeros(())
    for k in range(len(feats_s) - 1):
        if transform == "vertex":
            lam_s = vertex_transform(feats_s[k], feats_s[k + 1])  # (B,)
            lam_t = vertex_transform(feats_t[k], feats_t[k + 1])  # (B,)
            trans = trans + (lam_s - lam_t).pow(2).mean()
        else:
            theta_s = (edges_s[k] - edges_s[k + 1]).pow(2).mean()  # scalar
            theta_t = (edges_t[k] - edges_t[k + 1]).pow(2).mean()  # scalar
            trans = trans + (theta_s - theta_t).pow(2)
    l1, l2, l3 = weights
    return l1 * vertex + l2 * edge + l3 * trans


@register_loss("irg")
class IRG(FeatureLoss):
    """IRG: logit vertices + max-normalized distance-matrix edges + cross-layer transformation.

    Shapes: taps of any shape (flattened per sample; student/teacher dims may differ);
    logits ``(B, K)`` on both sides. Default taps: last stage and penultimate feature.
    No adapter (the paper's vertex term is on the logits, whose sizes already match).

    Args:
        vertex_weight: ``lambda_1``, the logit (vertex) term.
        edge_weight: ``lambda_2``, the edge (distance matrix) terms.
        transform_weight: ``lambda_3``, the transformation terms between consecutive taps.
        transform: ``"edge"`` (change of the distance matrices) or ``"vertex"`` (change of
            each instance's feature; needs equal sizes of consecutive taps).
        student_taps: Student module paths, shallow to deep.
        teacher_taps: Teacher module paths, one per student path.
    """

    knowledge = "relation"
    citation = "Liu, Cao, Li, Yuan, Hu, Li, Duan. Knowledge Distillation via Instance Relationship Graph. CVPR 2019."
    default_taps = "last_stage"
    uses_logits = True
    search_space = {
        "vertex_weight": Range(low=0.1, high=10.0, log=True),  # paper's lambda_1..3 (defaults 1)
        "edge_weight": Range(low=0.1, high=10.0, log=True),
        "transform_weight": Range(low=0.1, high=10.0, log=True),
    }

    def __init__(
        self,
        vertex_weight: Annotated[float, Field(ge=0.0)] = 1.0,
        edge_weight: Annotated[float, Field(ge=0.0)] = 1.0,
        transform_weight: Annotated[float, Field(ge=0.0)] = 1.0,
        transform: Literal["edge", "vertex"] = "edge",
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.weights = (vertex_weight, edge_weight, transform_weight)
        self.transform = transform

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> Needs:
        if teacher is None:
            raise ConfigError("loss 'irg' reads teacher features, but the run has no teacher")
        given = (self.student_taps, self.teacher_taps)
        if not self.student_taps:  # default: last stage + penultimate (the deepest two layers)
            self.student_taps = list(
                dict.fromkeys(
                    default_paths(student, "last_stage", "student") + default_paths(student, "penultimate", "student")
                )
            )
        if not self.teacher_taps:
            self.teacher_taps = list(
                dict.fromkeys(
                    default_paths(teacher, "last_stage", "teacher") + default_paths(teacher, "penultimate", "teacher")
                )
            )
        try:
            return super().bind(student, teacher)
        finally:
            self.student_taps, self.teacher_taps = given

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        check_logits_match(student, teacher, "irg")
        if self.transform == "vertex":
            for feats, role in (
                (self.student_features(student), "student"),
                (self.teacher_features(teacher), "teacher"),
            ):
                for k in range(len(feats) - 1):
                    if feats[k][0].numel() != feats[k + 1][0].numel():
                        raise ShapeError(
                            f"losses.irg: transform 'vertex' needs consecutive {role} taps of equal size, got "
                            f"{tuple(feats[k].shape)} and {tuple(feats[k + 1].shape)} ({self.pairs[k]} -> "
                            f"{self.pairs[k + 1]}); use transform: edge or other taps"
                        )

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        return irg_loss(
            self.student_features(student),
            self.teacher_features(teacher),
            *logits_pair(student, teacher, "irg"),
            self.weights,
            self.transform,
        )
