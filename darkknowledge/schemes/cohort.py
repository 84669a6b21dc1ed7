"""Shared pieces of the online schemes (``mutual``, ``kdcl``, ``one``, ``codistill``).

Online distillation trains every model of a *cohort* together from scratch; there is no
pre-trained teacher (Gou et al., Knowledge Distillation: A Survey, IJCV 2021, Sec. 4.2).
This module holds what the cohort schemes share:

* :func:`build_peers`: the peers of one seed from ``scheme.params`` (peer 0 shares the
  baseline's initialisation; the others get seed-derived seeds).
* :func:`peer_kl`: the per-peer distillation term towards *detached* targets, so the
  gradient of peer ``i``'s loss reaches peer ``i`` only.
* :class:`Ensemble`: an evaluation-only view that averages the peers' probabilities. It
  is kept outside the trainable module (it only references the peers), so the optimizer
  never sees a parameter twice.
* :class:`CohortScheme`: the ``Scheme`` plumbing common to cohorts (device moves, the
  class-count check of the dry run, evaluated models, export, describe).

Why one module and a sum of per-peer losses: each peer's loss depends on the others only
through detached tensors, so ``d(sum_i L_i) / d(theta_k) = d L_k / d(theta_k)``: one backward
pass gives every peer exactly its own gradient, and AdamW/SGD keep state per parameter, so
each peer has its own optimizer state. This equals the papers' per-peer updates except that
all peers step *simultaneously* on the same batch (DML's Algorithm 1 updates the peers in
turn, recomputing the others' predictions between updates). A global
``train.clip_grad_norm`` clips the cohort's joint gradient norm, not each peer's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses.base import SetupInfo
from darkknowledge.losses.ce import cross_entropy
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.models import count_params
from darkknowledge.schemes.base import Scheme
from darkknowledge.taps import unwrap

if TYPE_CHECKING:
    from darkknowledge.schemes.context import SchemeContext

PEER_SEED_STRIDE = 10_007
"""Peer ``i`` of seed ``s`` is initialised with seed ``s + i * PEER_SEED_STRIDE`` (peer 0: ``s``)."""


def peer_seed(seed: int, index: int) -> int:
    """The initialisation seed of peer ``index`` for run seed ``seed`` (peer 0 keeps ``seed``).

    The stride keeps peer seeds away from the run's other seeds (seed 0's peer 1 is not
    seed 1's baseline).
    """
    return seed + index * PEER_SEED_STRIDE


def build_peers(ctx: SchemeContext, seed: int, peers: Sequence[Mapping[str, Any]] | None,
                n: int | None, where: str = "scheme.params") -> list[nn.Module]:
    """The cohort of one seed: ``peers`` model specs, or ``n`` copies of the recipe's student.

    Peer 0 is built with ``seed`` itself, so with the default peers (or a first spec equal to
    the recipe's student) it starts from the same weights as that seed's baseline.

    Args:
        ctx: The run's context.
        seed: The run seed.
        peers: Model specs ``{name, params}``, one per peer (None: the recipe's student).
        n: Number of peers (default: ``len(peers)``, or 2).
        where: Config path of the params, for error messages.

    Raises:
        ConfigError: Fewer than two peers, ``n`` disagreeing with ``peers``, or a bad spec.
    """
    if peers is None:
        n = 2 if n is None else n
        if n < 2:
            raise ConfigError(f"{where}.n: a cohort needs at least 2 peers, got n={n}")
        specs: list[Mapping[str, Any] | None] = [None] * n
    else:
        if len(peers) < 2:
            raise ConfigError(f"{where}.peers: a cohort needs at least 2 peer specs, got {len(peers)}")
        if n is not None and n != len(peers):
            raise ConfigError(f"{where}.n={n} disagrees with the {len(peers)} specs in {where}.peers; "
                              "drop n or list exactly n peers")
        specs = list(peers)
    models = []
    for i, spec in enumerate(specs):
        if spec is not None and not isinstance(spec, Mapping):
            raise ConfigError(f"{where}.peers.{i}: expected a model spec like {{name: mlp, params: {{hidden: [64]}}}}, "
                              f"got {spec!r}")
        models.append(ctx.model(spec, seed=peer_seed(seed, i), where=f"{where}.peers.{i}"))
    return models


def cohort_ce(logits: Sequence[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    """Cross-entropy of each peer with the labels (unlabelled samples, ``y == -1``, ignored).

    Args:
        logits: ``N`` tensors ``(B, K)``.
        y: ``(B,)`` labels.

    Returns:
        ``N`` scalars.
    """
    return [cross_entropy(z, y) for z in logits]


def peer_kl(logits: Sequence[torch.Tensor], T: float) -> list[torch.Tensor]:
    """DML's distillation term of each peer: the mean KL from every other peer's prediction.

    ``kl_k = 1/(N-1) * sum_{l != k} T^2 KL(p_l^T || p_k^T)`` where the targets ``p_l`` are
    *detached*: ``kl_k`` sends gradient into peer ``k`` only.

    Args:
        logits: ``N >= 2`` tensors ``(B, K)``.
        T: Temperature (DML: 1).

    Returns:
        ``N`` scalars.
    """
    n = len(logits)
    if n < 2:
        raise ShapeError(f"peer_kl needs at least 2 peers, got {n}")
    targets = [z.detach() for z in logits]  # (B, K) each, constants
    return [sum(kd_soft_loss(logits[k], targets[j], T) for j in range(n) if j != k) / (n - 1) for k in range(n)]


def mean_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of the peers' softmax probabilities, ``(B, K)``."""
    return torch.stack([F.softmax(z.float(), dim=-1) for z in logits]).mean(dim=0)  # (N, B, K) -> (B, K)


class Ensemble(nn.Module):
    """Evaluation-only ensemble: the log of the mean of the members' softmax probabilities.

    The output is a log-probability ``(B, K)``: its argmax is the averaged prediction and
    ``cross_entropy`` of it is the ensemble's negative log-likelihood. Keep instances outside
    the scheme's trainable module (they only reference the members).

    Args:
        members: The models to average (same class count).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = mean_probs([m(x) for m in self.members])  # (B, K)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def burn_in_factor(epoch_progress: float, burn_in: float) -> float:
    """0 before ``burn_in`` epochs of training, 1 from then on (Anil et al. 2018's burn-in)."""
    return 0.0 if epoch_progress < burn_in else 1.0


class CohortScheme(Scheme):
    """Scheme plumbing shared by cohorts of peers (subclasses build ``self._module``).

    Subclasses set ``self._module`` (with a ``peers`` ``ModuleList``) and may override
    :meth:`member_names` and :meth:`extra_eval`. Peer 0 is the primary, exported model.
    """

    _module: nn.Module
    loss_terms: tuple[str, ...] = ("ce", "kl")

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def peers(self) -> list[nn.Module]:
        """The peers, in order (peer 0 first)."""
        return list(self._module.peers)

    def member_names(self) -> list[str]:
        """Report names of the peers: ``student``, ``peer1``, ``peer2``..."""
        return ["student"] + [f"peer{i}" for i in range(1, len(self.peers))]

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """Dry run: every peer must predict the same classes."""
        was_training = self._module.training
        self._module.eval()
        try:
            with torch.no_grad():
                shapes = [tuple(p(batch.x).shape) for p in self.peers]
        finally:
            self._module.train(was_training)
        if len(set(shapes)) != 1:
            listed = ", ".join(f"{name} ({type(unwrap(p)).__name__}): {s}"
                               for name, p, s in zip(self.member_names(), self.peers, shapes))
            raise ShapeError(f"scheme {self.registry_name!r}: the peers' logits differ in shape ({listed}); "
                             "every peer must predict the dataset's classes")
        self.info = replace(info or SetupInfo(num_samples=len(batch), batch_size=len(batch)),
                            num_classes=int(shapes[0][-1]))

    def extra_eval(self) -> dict[str, nn.Module]:
        """Evaluated models beyond the peers (default: the mean-probability ensemble)."""
        return {"ensemble": self._ensemble}

    def eval_models(self) -> dict[str, nn.Module]:
        return {**dict(zip(self.member_names(), self.peers)), **self.extra_eval()}

    def export_model(self) -> nn.Module:
        return self.peers[0]

    def describe(self) -> dict[str, Any]:
        extra = count_params(self._module) - count_params(self.peers[0])
        return {"losses": list(self.loss_terms), "adapter_params": extra}

    def _init_ensemble(self) -> None:
        self._ensemble = Ensemble(self.peers)
