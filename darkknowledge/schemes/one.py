"""ONE: an on-the-fly gated ensemble of the peers teaches every peer.

Lan, Zhu & Gong, "Knowledge Distillation by On-the-Fly Native Ensemble", NeurIPS 2018
(Sec. 3). ONE builds ``m`` branches on a shared trunk; a gate ``g = softmax(ReLU(BN(W x)))``
over the branches, computed from the trunk's feature ``x``, weights the branch logits into
the teacher ``z_e = sum_i g_i z_i``, and the overall loss is::

    L = sum_i CE(z_i, y) + CE(z_e, y) + weight * T^2 * sum_i KL( p_e^T || p_i^T )

The teacher is detached in the KL terms: in the authors' code (``loss/kl_loss.py`` of
Lan1991Xu/ONE_NeurIPS2018) the target distribution is built from ``label.data`` with
``requires_grad=False``, so the KL terms train the branches only, while ``CE(z_e)`` trains the
gate and (through ``z_i``) the branches. The authors' code uses ``T = 3`` and ramps the KL
weight up with a sigmoid schedule (``rampup``).

Peers instead of branches: our peers are independent models (any architectures) without a
shared trunk, so the gate reads a tapped feature of peer 0 (``gate_tap``, default
``fc:input``, its penultimate feature; maps are averaged over their spatial axes). That
feature is *detached* before the gate: the gate learns from ``CE(z_e)`` without pushing its
own gradient into peer 0's representation, so every peer's representation is trained by
its own terms and by ``CE(z_e)`` through its logits only. Unlabelled transfer samples get
the KL terms only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses.base import SetupInfo
from darkknowledge.losses.ce import cross_entropy
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.schemes import register_scheme
from darkknowledge.schemes.cohort import CohortScheme, build_peers, cohort_ce
from darkknowledge.taps import FeatureTaps, validate_taps

if TYPE_CHECKING:
    from darkknowledge.schemes.context import SchemeContext


def sigmoid_rampup(epoch_progress: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = min(1, epoch_progress / length)``; 1 when ``length == 0``.

    The ramp-up of the KL weight in the ONE authors' code (from Laine & Aila 2017).
    """
    if length <= 0:
        return 1.0
    t = min(1.0, max(0.0, epoch_progress / length))
    return math.exp(-5.0 * (1.0 - t) ** 2)


def pool_feature(feature: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, C)`` by averaging the spatial axes; ``(B, D)`` unchanged."""
    if feature.dim() < 2:
        raise ShapeError(f"the gate feature must have a batch axis and a channel axis, got {tuple(feature.shape)}")
    return feature.flatten(2).mean(dim=-1) if feature.dim() > 2 else feature


def gated_logits(logits: Sequence[torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
    """ONE's teacher logits ``z_e = sum_i g_i z_i``.

    Args:
        logits: ``N`` tensors ``(B, K)``.
        gate: ``(B, N)`` weights (rows sum to 1).

    Returns:
        ``(B, K)``.
    """
    z = torch.stack(list(logits), dim=1)  # (B, N, K)
    if gate.shape != z.shape[:2]:
        raise ShapeError(f"gate {tuple(gate.shape)} does not match {z.shape[1]} peers x batch {z.shape[0]}")
    return (gate.unsqueeze(-1).to(z.dtype) * z).sum(dim=1)  # (B, K)


class Gate(nn.Module):
    """ONE's gate: ``softmax(ReLU(BN(Linear(x))))`` over the ``N`` peers.

    Args:
        in_features: Width of the (pooled) gate feature.
        n: Number of peers.
    """

    def __init__(self, in_features: int, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, n)
        self.bn = nn.BatchNorm1d(n)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return F.softmax(F.relu(self.bn(self.fc(feature))), dim=-1)  # (B, D) -> (B, N)


class ONECohort(nn.Module):
    """The peers, the gate (built by :meth:`build_gate`) and ONE's objective.

    Args:
        peers: ``N >= 2`` models; peer 0's ``gate_tap`` feeds the gate.
        gate_tap: Tap path in peer 0 (default ``fc:input``).
        T: Temperature of the KL terms.
        weight: Weight of the KL terms.
        rampup: Epochs of the sigmoid ramp-up of the KL weight (0: none).
    """

    def __init__(self, peers: Sequence[nn.Module], gate_tap: str = "fc:input", T: float = 3.0,
                 weight: float = 1.0, rampup: float = 0.0) -> None:
        super().__init__()
        self.peers = nn.ModuleList(peers)
        validate_taps(self.peers[0], [gate_tap])
        self.gate_tap, self.T, self.weight, self.rampup = gate_tap, T, weight, rampup
        self.taps = FeatureTaps(self.peers[0], [gate_tap])
        self.taps.active = False  # record only inside outputs(), not when peer 0 is evaluated alone
        self.gate: Gate | None = None

    def build_gate(self, x: torch.Tensor) -> None:
        """Create the gate for the width of peer 0's tapped feature on inputs ``x``."""
        with torch.no_grad():
            _, feature = self.outputs(x, need_gate=False)
        self.gate = Gate(int(feature.shape[-1]), len(self.peers)).to(x.device)

    def outputs(self, x: torch.Tensor, need_gate: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every peer's logits and the detached, pooled gate feature of peer 0."""
        self.taps.active = True
        try:
            first = self.peers[0](x)  # (B, K)
        finally:
            self.taps.active = False
        feature = pool_feature(self.taps.pop()[self.gate_tap]).detach()  # (B, D), no gradient into peer 0
        if need_gate and self.gate is None:
            raise RuntimeError("ONE's gate is built by the scheme's setup(); call setup(batch) first")
        return [first, *(p(x) for p in self.peers[1:])], feature

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The gated ensemble ``z_e`` ``(B, K)`` (used for evaluation)."""
        logits, feature = self.outputs(x)
        return gated_logits(logits, self.gate(feature))

    def forward(self, batch: Batch, teacher: Any = None,
                epoch_progress: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, feature = self.outputs(batch.x)  # N x (B, K), (B, D)
        gate = self.gate(feature)  # (B, N)
        z_e = gated_logits(logits, gate)  # (B, K): CE(z_e) trains the gate and every peer
        ce = torch.stack(cohort_ce(logits, batch.y)).sum()
        ce_e = cross_entropy(z_e, batch.y, all_labeled=batch.labeled)
        target = z_e.detach()  # ONE's KL target is a constant (authors' code: label.data)
        kl = torch.stack([kd_soft_loss(z, target, self.T) for z in logits]).sum()
        w = self.weight * sigmoid_rampup(epoch_progress, self.rampup)
        return ce + ce_e + w * kl, {"ce": ce.detach(), "ce_ensemble": ce_e.detach(), "kl": kl.detach()}


class GatedEnsemble(nn.Module):
    """Evaluation view of ONE's teacher ``z_e`` (kept outside the trainable module's tree)."""

    def __init__(self, cohort: ONECohort) -> None:
        super().__init__()
        self.cohort = cohort

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cohort.teacher_logits(x)


@register_scheme("one")
class ONE(CohortScheme):
    """ONE: a learned gate ensembles the peers' logits on the fly; the ensemble teaches them.

    Args:
        peers: The cohort (peer 0 is the primary, exported model and feeds the gate).
        gate_tap: Tap path of peer 0 read by the gate.
        T: Temperature of the KL terms (authors' code: 3).
        weight: Weight of the KL terms.
        rampup: Epochs of the sigmoid ramp-up of the KL weight.
    """

    citation = "Lan, Zhu, Gong. Knowledge Distillation by On-the-Fly Native Ensemble (ONE). NeurIPS 2018."
    summary = "a gate weights the peers' logits into an online teacher (trained by CE) that teaches every peer by KL"
    loss_terms = ("ce", "ce_ensemble", "kl")
    report_notes: ClassVar[tuple[str, ...]] = (
        (
            "one: peers are independent models (no shared trunk); the gate reads peer 0's penultimate feature (detached); "
            "'ensemble' is the gated teacher z_e = sum_i g_i z_i, 'student' is peer 0 (same initialisation as the baseline)"
        ),
    )

    def __init__(self, peers: Sequence[nn.Module], gate_tap: str = "fc:input", T: float = 3.0,
                 weight: float = 1.0, rampup: float = 0.0) -> None:
        self._module = ONECohort(peers, gate_tap, T, weight, rampup)
        self._ensemble = GatedEnsemble(self._module)

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """Check the peers' class counts and build the gate for peer 0's feature width."""
        super().setup(batch, info)
        if self._module.gate is None:
            was_training = self._module.training
            self._module.eval()
            try:
                self._module.build_gate(batch.x)
            finally:
                self._module.train(was_training)

    @classmethod
    def build(
        cls,
        ctx: SchemeContext,
        seed: int,
        peers: list[dict[str, Any]] | None = None,
        n: Annotated[int, Field(ge=2)] | None = None,
        gate_tap: str = "fc:input",
        T: Annotated[float, Field(gt=0.0)] = 3.0,
        weight: Annotated[float, Field(ge=0.0)] = 1.0,
        rampup: Annotated[float, Field(ge=0.0)] = 0.0,
    ) -> ONE:
        """The cohort of ``seed``.

        Args:
            ctx: The run's context.
            seed: Run seed (peer 0 gets the baseline's initialisation).
            peers: Model specs ``{name, params}`` (default: ``n`` copies of the recipe's student).
            n: Number of peers (default 2, or ``len(peers)``; the paper uses 3 branches).
            gate_tap: Peer 0's feature read by the gate (a tap path, e.g. ``fc:input``, ``blocks.0``).
            T: Softmax temperature of the KL terms.
            weight: Weight of the KL terms.
            rampup: Epochs of sigmoid ramp-up of the KL weight (0: full weight from the start).
        """
        return cls(build_peers(ctx, seed, peers, n), gate_tap=gate_tap, T=T, weight=weight, rampup=rampup)
