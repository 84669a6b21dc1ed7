"""ONE: an on-the-fly gated ensemble of the peers teaches every peer.

Lan, Zhu & Gong, "Knowledge Distillation by On-the-Fly Native Ensemble", NeurIPS 2018
(Sec. 3). ONE builds ``m`` branches on a shared trunk; a gate ``g = softmax(ReLU(BN(W x)))``
over the branches, computed from the trunk's feature ``x``, weights the branch logits into
the teacher ``z_e = sum_i g_i z_i``, and the overall loss is::

    L = sum_i CE(z_i, y) + CE(z_e, y) + T^2 * sum_i KL( p_e^T || p_i^T )

The teacher is detached in the KL terms: in the authors' code (``loss/kl_loss.py`` of
Lan1991Xu/ONE_NeurIPS2018) the target distribution is built from ``label.data`` with
``requires_grad=False``, so the KL terms train the branches only, while ``CE(z_e)`` trains the
gate and (through ``z_i``) the branches. The authors' code uses ``T = 3`` and ramps the KL
weight up with a sigmoid schedule (here the term's ``warmup_epochs`` with ``warmup_shape: sigmoid``).

Plan: the peers are views, and so is the gated ensemble (``ensemble``, trainable: its gate
learns from the terms that read no teacher, ``CE(z_e)``); each peer is taught by the
ensemble, detached (a :class:`~darkknowledge.teachers.peers.Peer`), through the recipe's
``losses``. The ensemble's features, for feature and relation losses, are the gate-weighted
sums of the peers' features (peers of one architecture).

Peers instead of branches: our peers are independent models (any architectures) without a
shared trunk, so the gate reads a tapped feature of peer 0 (``gate_tap``, default
``fc:input``, its penultimate feature; maps are averaged over their spatial axes). That
feature is *detached* before the gate: the gate learns from ``CE(z_e)`` without pushing its
own gradient into peer 0's representation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses.base import Outputs, SetupInfo, class_logits
from darkknowledge.schemes.base import Scheme, register_scheme
from darkknowledge.schemes.cohort import COHORT_MOVED, CohortParams, build_peers, peer_names, view_suffix
from darkknowledge.schemes.task import FlowTask
from darkknowledge.schemes.wiring import require_teacher_terms, taught
from darkknowledge.teachers.flow import Flow
from darkknowledge.teachers.peers import Peer

if TYPE_CHECKING:
    from darkknowledge.schemes.context import Context


def pool_feature(feature: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, C)`` by averaging the spatial axes; ``(B, D)`` unchanged."""
    if feature.dim() < 2:
        raise ShapeError(f"the gate feature must have a batch axis and a channel axis, got {tuple(feature.shape)}")
    return feature.flatten(2).mean(dim=-1) if feature.dim() > 2 else feature


def gated_logits(values: Sequence[torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
    """ONE's teacher ``z_e = sum_i g_i z_i`` (also for features: ``sum_i g_i f_i``).

    Args:
        values: ``N`` tensors ``(B, K)`` (or ``(B, *S)``).
        gate: ``(B, N)`` weights (rows sum to 1).

    Returns:
        ``(B, K)`` (or ``(B, *S)``).
    """
    z = torch.stack(list(values), dim=1)  # (B, N, *S)
    if gate.shape != z.shape[:2]:
        raise ShapeError(f"gate {tuple(gate.shape)} does not match {z.shape[1]} peers x batch {z.shape[0]}")
    g = gate.reshape(*gate.shape, *([1] * (z.dim() - 2))).to(z.dtype)  # (B, N, 1, ...)
    return (g * z).sum(dim=1)  # (B, *S)


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


class ONEFlow(Flow):
    """The peers, the gate, and the gated ensemble as a view computed from the peers.

    The gate is built by the dry run (``setup``), sized by peer 0's feature at ``gate_tap``, as
    adapters are: like the ONE authors' code it is initialised after the peers and the data.
    """

    def __init__(self, peers: dict[str, nn.Module], gate_tap: str, links: list[Any]) -> None:
        self.peer_views, self.gate_tap = list(peers), gate_tap
        self.ensemble_taps: tuple[str, ...] = ()
        first = next(iter(peers.values()))
        super().__init__(peers, links, tap_models={"ensemble": first}, extra_taps={self.peer_views[0]: [gate_tap]})
        self.gate: Gate | None = None

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """Build the gate for the width of peer 0's (pooled) feature, then the dry run."""
        if self.gate is None:
            was_training = self.training
            self.eval()
            try:
                with torch.no_grad():
                    feature = pool_feature(self.run_view(self.peer_views[0], batch.x).feature(self.gate_tap))
            finally:
                self.train(was_training)
            self.gate = Gate(int(feature.shape[-1]), len(self.peer_views)).to(feature.device)
        super().setup(batch, info)

    def route_taps(self, wanted: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        """The ensemble's taps are recorded on every peer and mixed by the gate."""
        self.ensemble_taps = wanted.pop("ensemble", ())
        for view in self.peer_views:
            wanted[view] = tuple(dict.fromkeys(wanted.get(view, ()) + self.ensemble_taps))
        return wanted

    def ensemble(self, peers: dict[str, Outputs]) -> Outputs:
        """``z_e = sum_i g_i z_i`` (and the gated features) from the peers' outputs."""
        outs = [peers[v] for v in self.peer_views]
        if self.gate is None:
            raise RuntimeError("ONE's gate is built by the dry run: call setup(batch) first")
        feature = pool_feature(outs[0].feature(self.gate_tap)).detach()  # (B, D): no gradient into peer 0
        gate = self.gate(feature)  # (B, N)
        feats = {p: gated_logits([o.feature(p) for o in outs], gate) for p in self.ensemble_taps}
        logits = gated_logits([class_logits(o, "ONE's gated ensemble") for o in outs], gate)  # (B, K)
        return Outputs(logits=logits, features=feats)

    def compute_views(self, batch: Batch) -> dict[str, Outputs]:
        views = {v: self.run_view(v, batch.x) for v in self.peer_views}
        views["ensemble"] = self.ensemble(views)
        return views


class GatedEnsemble(nn.Module):
    """Evaluation view of ONE's teacher ``z_e`` (kept outside the trainable module's tree)."""

    def __init__(self, flow: ONEFlow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = {v: self.flow.run_view(v, x) for v in self.flow.peer_views}
        return class_logits(self.flow.ensemble(views), "ONE's gated ensemble")


class ONEParams(CohortParams):
    """``scheme.params`` of ``one``."""

    gate_tap: str = "fc:input"


@register_scheme("one")
class ONE(Scheme):
    """ONE: a learned gate ensembles the peers' logits on the fly; the ensemble teaches them."""

    citation = "Lan, Zhu, Gong. Knowledge Distillation by On-the-Fly Native Ensemble (ONE). NeurIPS 2018."
    summary = "a gate weights the peers' logits into an online teacher (trained by CE) that teaches every peer"
    report_notes: ClassVar[tuple[str, ...]] = (
        (
            "one: peers are independent models (no shared trunk); the gate reads peer 0's penultimate feature "
            "(detached); 'ensemble' is the gated teacher z_e = sum_i g_i z_i, 'student' is peer 0 (same "
            "initialisation as the baseline)"
        ),
    )
    example: ClassVar[dict[str, Any]] = {"teacher": None, "scheme": {"params": {"n": 3}}}
    Params = ONEParams
    moved = COHORT_MOVED

    @classmethod
    def task(cls, ctx: Context, seed: int, params: Any) -> FlowTask:
        """The cohort of ``seed`` (the gate is built by the dry run)."""
        require_teacher_terms(ctx.objective(), "one")
        peers = build_peers(ctx, seed, params.peers, params.n)
        names = peer_names(len(peers))
        teacher = Peer("ensemble", peers[0])
        links: list[Any] = taught("ensemble", ctx.objective, [], untaught=True, suffix="@ensemble")
        if not links:
            raise ConfigError(
                f"scheme 'one': the gated ensemble learns from the terms that read no teacher (the "
                f"paper's CE(z_e)), but none of the losses {list(ctx.objective().terms)} is one; "
                "add ce: {}"
            )
        for name in names:
            links += taught(name, ctx.objective, [teacher], suffix=view_suffix(name))
        flow = ONEFlow(dict(zip(names, peers)), params.gate_tap, links)
        return FlowTask(flow, {**dict(zip(names, peers)), "ensemble": GatedEnsemble(flow)})


__all__ = ["ONE", "GatedEnsemble", "Gate", "gated_logits", "pool_feature"]
