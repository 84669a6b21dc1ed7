"""Shared pieces of the online schemes (``mutual``, ``kdcl``, ``one``, ``codistill``).

Online distillation trains every model of a *cohort* together from scratch; there is no
pre-trained teacher (Gou et al., Knowledge Distillation: A Survey, IJCV 2021, Sec. 4.2). The
peers are the views of one :class:`~darkknowledge.teachers.flow.Flow`: peer 0 is ``student``
(the baseline's initialisation, the exported model), the others ``peer1``, ``peer2``...; each
peer learns the recipe's ``losses`` from online teachers made of the other peers' detached
outputs (:mod:`darkknowledge.teachers.peers`, :mod:`darkknowledge.teachers.ensemble`).

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
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field
from torch import nn

from darkknowledge.errors import ConfigError
from darkknowledge.schemes.base import MOVED_TO_LOSSES, SchemeParams

if TYPE_CHECKING:
    from darkknowledge.schemes.context import Context

PEER_SEED_STRIDE = 10_007
"""Peer ``i`` of seed ``s`` is initialised with seed ``s + i * PEER_SEED_STRIDE`` (peer 0: ``s``)."""

COHORT_MOVED = {k: MOVED_TO_LOSSES[k] for k in ("T", "weight", "burn_in", "rampup")}


class CohortParams(SchemeParams):
    """``scheme.params`` of a cohort: its peers."""

    peers: list[Any] | None = Field(
        default=None, description="model specs {name, params}, one per peer (default: n copies of the recipe's student)"
    )
    n: Annotated[int, Field(ge=2)] | None = Field(
        default=None, description="number of peers (default 2, or len(peers))"
    )


def peer_seed(seed: int, index: int) -> int:
    """The initialisation seed of peer ``index`` for run seed ``seed`` (peer 0 keeps ``seed``).

    The stride keeps peer seeds away from the run's other seeds (seed 0's peer 1 is not
    seed 1's baseline).
    """
    return seed + index * PEER_SEED_STRIDE


def peer_names(n: int) -> list[str]:
    """View names of a cohort: ``student``, ``peer1``, ``peer2``..."""
    return ["student"] + [f"peer{i}" for i in range(1, n)]


def view_suffix(name: str) -> str:
    """Metric suffix of a view's terms: none for the student, ``@peer1`` for the others."""
    return "" if name == "student" else f"@{name}"


def build_peers(
    ctx: Context, seed: int, peers: Sequence[Mapping[str, Any]] | None, n: int | None, where: str = "scheme.params"
) -> list[nn.Module]:
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
            raise ConfigError(
                f"{where}.n={n} disagrees with the {len(peers)} specs in {where}.peers; drop n or list exactly n peers"
            )
        specs = list(peers)
    models = []
    for i, spec in enumerate(specs):
        if spec is not None and not isinstance(spec, Mapping):
            raise ConfigError(
                f"{where}.peers.{i}: expected a model spec like {{name: mlp, params: {{hidden: [64]}}}}, got {spec!r}"
            )
        models.append(ctx.model(spec, seed=peer_seed(seed, i), where=f"{where}.peers.{i}"))
    return models
