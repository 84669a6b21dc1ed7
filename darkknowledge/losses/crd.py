"""Contrastive Representation Distillation: NCE between student and teacher embeddings.

Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020, Sec. 3.2-3.4,
following the authors' code (HobbitLong/RepDistiller ``crd/criterion.py``, ``crd/memory.py``).

* Embeddings (``Embed``): ``v_s = l2norm(W_s f_s)``, ``v_t = l2norm(W_t f_t)`` of the flattened
  penultimate features ``f_s (B, D_s)``, ``f_t (B, D_t)``, both ``(B, feat_dim)``. ``W_t`` is
  trainable (a linear head on the teacher side, as in the paper; trained by the student's
  optimizer), the teacher network itself stays frozen.
* Memory banks ``M_s, M_t (N, feat_dim)``, one row per training sample (``N = num_samples``),
  initialised uniform in ``[-sqrt(3/d), sqrt(3/d)]``, updated with momentum ``m``:
  ``M[i] <- normalize(m M[i] + (1 - m) v_i)`` for the batch's samples ``i``.
* Scores against the positive (the sample's own index) and ``K`` negatives (other indices):
  ``h_s(i, j) = exp(<v_s,i, M_t[j]> / tau) / Z_s`` and ``h_t(i, j) = exp(<v_t,i, M_s[j]> / tau) / Z_t``,
  with ``Z = N * mean(exp(<., .> / tau))`` estimated once, on the first batch, then fixed.
* NCE (Eq. 18, ``ContrastLoss``), with ``P_n = 1/N``, for ``h = h_s`` and ``h = h_t``:
  ``L(h) = -1/B * sum_i [ log(h_i0 / (h_i0 + K P_n + eps)) + sum_{k=1..K} log(K P_n / (h_ik + K P_n + eps)) ]``,
  ``L_CRD = L(h_s) + L(h_t)``.

Defaults (RepDistiller ``train_student.py``): ``feat_dim=128``, ``nce_k=16384`` (capped at
``N - 1``), ``T=0.07`` (RepDistiller's ``nce_t``, the contrastive temperature ``tau``),
``nce_m=0.5``; RepDistiller weighs CRD with ``beta=0.8`` beside CE (``-r 1``) and, for CRD+KD,
KD (``-a 1``) — set in the recipe.

Differences from RepDistiller, each deliberate:

* Negatives: RepDistiller's default ('exact') data loader draws the ``K`` negatives without
  replacement from samples of *other classes*; here they are drawn uniformly without
  replacement from all indices except the positive (labels are unknown on a transfer set).
* The memory update of a step is applied at the end of the *next* step's forward (right after
  that step's scores are computed) instead of at the end of its own. The scores of a step
  therefore see the batches before the previous one updated; a batch's rows only serve as
  negatives for other batches, so the lag of one step out of an epoch is immaterial, and it
  makes the loss a pure function of (weights, memory, batch) within a step — calling the loss
  twice on the same batch gives the same value. The pending update is part of the
  checkpoint (``get_extra_state``), so resuming reproduces an uninterrupted run.
* Under DDP, every rank's indices and embeddings are all-gathered before the update, so the
  banks stay identical on every rank; ``Z`` is averaged over the ranks' first batches.

Knowledge type: the survey (Gou et al., IJCV 2021) lists CRD among the feature-based
methods: it transfers the teacher's representation (penultimate feature) per sample, and
the relations it uses (positive vs negatives) are a device of the contrastive objective,
not the knowledge transferred.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses import register_loss
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.feature import FeatureLoss
from darkknowledge.search_space import Range

EPS = 1e-7  # RepDistiller crd/criterion.py


def sample_negatives(positive: torch.Tensor, num_samples: int, k: int) -> torch.Tensor:
    """``k`` distinct indices per row, uniform over ``[0, num_samples)`` minus the row's positive.

    A random permutation of ``[0, N-1)`` is read in a window of ``k`` consecutive (cyclic)
    positions from a random start per row: each row is a uniform ``k``-subset drawn without
    replacement; values ``>= positive`` are shifted by one to skip the positive.

    Args:
        positive: ``(B,)`` indices of the positives.
        num_samples: ``N``, the size of the memory bank.
        k: Negatives per row, ``1 <= k <= N - 1``.

    Returns:
        ``(B, k)`` long indices.
    """
    device, b = positive.device, len(positive)
    perm = torch.randperm(num_samples - 1, device=device)  # (N-1,)
    start = torch.randint(0, num_samples - 1, (b, 1), device=device)  # (B, 1)
    offsets = torch.arange(k, device=device).unsqueeze(0)  # (1, k)
    r = perm[(start + offsets) % (num_samples - 1)]  # (B, k), distinct within a row
    return r + (r >= positive.unsqueeze(1)).long()  # (B, k), never the positive


def contrast_scores(anchor: torch.Tensor, memory: torch.Tensor, index: torch.Tensor, tau: float) -> torch.Tensor:
    """``exp(<anchor_i, memory[index_ij]> / tau)`` (unnormalised, before dividing by ``Z``).

    Args:
        anchor: ``(B, d)`` unit-norm embeddings.
        memory: ``(N, d)`` memory bank (a constant).
        index: ``(B, K+1)`` rows of ``memory`` per anchor, the positive first.
        tau: Temperature.

    Returns:
        ``(B, K+1)``.
    """
    logits = anchor @ memory.t()  # (B, N): one matmul is cheaper than gathering (B, K+1, d) rows
    return torch.exp(logits.gather(1, index) / tau)  # (B, K+1)


def nce_loss(scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """RepDistiller's ``ContrastLoss`` (Eq. 18): NCE with the positive in column 0.

    Args:
        scores: ``(B, K+1)`` normalised scores ``h``.
        num_samples: ``N``; the noise distribution is uniform, ``P_n = 1/N``.

    Returns:
        Scalar.
    """
    b, k = scores.shape[0], scores.shape[1] - 1
    kpn = k / float(num_samples)  # K * P_n
    log_d1 = torch.log(scores[:, 0] / (scores[:, 0] + kpn + EPS))  # (B,): log P(D=1 | positive)
    log_d0 = torch.log(kpn / (scores[:, 1:] + kpn + EPS))  # (B, K): log P(D=0 | negative)
    return -(log_d1.sum() + log_d0.sum()) / max(b, 1)


@torch.no_grad()
def momentum_update(
    memory: torch.Tensor, index: torch.Tensor, embedding: torch.Tensor, momentum: float
) -> torch.Tensor:
    """``memory[i] <- normalize(momentum * memory[i] + (1 - momentum) * embedding_i)``, out of place.

    Out of place because the current step's graph still holds ``memory`` (the scores' backward
    needs it).

    Args:
        memory: ``(N, d)`` bank.
        index: ``(n,)`` rows to update.
        embedding: ``(n, d)`` new embeddings of those rows.
        momentum: Weight of the old row.

    Returns:
        The updated ``(N, d)`` bank (a new tensor).
    """
    rows = memory.index_select(0, index) * momentum + embedding.to(memory.dtype) * (1.0 - momentum)  # (n, d)
    return memory.index_copy(0, index, F.normalize(rows, p=2, dim=1))  # (N, d)


def gather_across_ranks(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate each tensor over all DDP ranks (dim 0, rank order); identity on one process.

    Ranks may hold different batch sizes (a last partial batch); sizes are exchanged first.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    world = dist.get_world_size()
    n = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)  # (1,)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    most = max(counts)
    out = []
    for t in tensors:
        padded = torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])  # (most, ...)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        out.append(torch.cat([p[:c] for p, c in zip(parts, counts)]))
    return tuple(out)


class Embed(nn.Module):
    """Flatten, linear map to ``dim_out``, L2-normalise (RepDistiller's ``Embed``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, *S) -> (B, dim_out), unit rows, fp32
        return F.normalize(self.linear(x.reshape(len(x), -1)).float(), p=2, dim=1)


@register_loss("crd")
class CRD(FeatureLoss):
    """Contrastive representation distillation (Tian et al. 2020) with two memory banks.

    Shapes: student/teacher penultimate features ``(B, ...)`` (flattened; widths may differ),
    sample indices ``batch.idx (B,)`` below ``num_samples``. Owns ``embed_s``, ``embed_t`` and the
    buffers ``memory_s``, ``memory_t`` ``(N, feat_dim)`` and ``z`` ``(2,)`` (checkpointed).

    Args:
        feat_dim: Embedding width (RepDistiller: 128).
        nce_k: Negatives per positive (RepDistiller: 16384); capped at ``num_samples - 1``.
        T: The contrastive temperature ``tau`` (RepDistiller's ``nce_t``: 0.07).
        nce_m: Momentum of the memory update (RepDistiller: 0.5).
        student_taps: One student module path (default: the penultimate feature).
        teacher_taps: One teacher module path (default: the penultimate feature).
    """

    knowledge = "feature"
    citation = "Tian, Krishnan, Isola. Contrastive Representation Distillation. ICLR 2020."
    default_taps = "penultimate"
    uses_indices = True
    renamed = {"nce_t": "T"}
    search_space = {
        "weight": Range(low=0.2, high=3.2, log=True),  # paper/RepDistiller: 0.8
        "T": Range(low=0.02, high=0.3, log=True),  # paper's temperature ablation; default 0.07
    }
    T: float
    z: torch.Tensor  # buffers
    memory_s: torch.Tensor
    memory_t: torch.Tensor

    def __init__(
        self,
        feat_dim: Annotated[int, Field(ge=1)] = 128,
        nce_k: Annotated[int, Field(ge=1)] = 16384,
        T: Annotated[float, Field(gt=0.0)] = 0.07,
        nce_m: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.feat_dim, self.nce_k, self.T, self.nce_m = feat_dim, nce_k, T, nce_m
        self.num_samples = 0
        self.k = 0
        self.register_buffer("z", torch.full((2,), -1.0))  # (Z_s, Z_t); < 0 until the first batch
        self._z_ready = False
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        """Build the embeddings and the memory banks from the probed widths and ``info.num_samples``."""
        if len(self.pairs) != 1:
            raise ConfigError(f"losses.crd: contrasts one feature pair, got {len(self.pairs)}: {self.pairs}")
        if teacher is None:
            raise ConfigError("loss 'crd' reads teacher features, but the run has no teacher")
        n = int(info.num_samples)
        if n < 2:
            raise ShapeError(f"loss 'crd' needs at least 2 training samples for negatives (num_samples={n})")
        (f_s,), (f_t,) = self.student_features(student), self.teacher_features(teacher)
        self.num_samples, self.k = n, min(self.nce_k, n - 1)
        self.embed_s = Embed(f_s[0].numel(), self.feat_dim)
        self.embed_t = Embed(f_t[0].numel(), self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3.0)
        self.register_buffer("memory_s", torch.rand(n, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.z.fill_(-1.0)
        self._z_ready, self._pending = False, None

    def _normalizers(self, out_s: torch.Tensor, out_t: torch.Tensor) -> torch.Tensor:
        """``(Z_s, Z_t)``: set from this batch the first time (averaged over ranks), then fixed."""
        if not self._z_ready:  # one host sync per process (also after a resume)
            if bool((self.z < 0).any()):
                est = torch.stack([out_s.mean(), out_t.mean()]).detach() * self.num_samples  # (2,)
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(est)
                    est /= dist.get_world_size()
                self.z.copy_(est)
            self._z_ready = True
        return self.z

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        (f_s,), (f_t,) = self.student_features(student), self.teacher_features(teacher)
        idx = batch.idx.to(device=f_s.device, dtype=torch.long)  # (B,)
        with torch.autocast(f_s.device.type, enabled=False):
            v_s = self.embed_s(f_s.float())  # (B, d), unit rows
            v_t = self.embed_t(f_t.detach().float())  # (B, d), unit rows
            neg = sample_negatives(idx, self.num_samples, self.k)  # (B, K)
            index = torch.cat([idx.unsqueeze(1), neg], dim=1)  # (B, K+1), positive first
            out_s = contrast_scores(v_s, self.memory_t, index, self.T)  # (B, K+1): student anchor
            out_t = contrast_scores(v_t, self.memory_s, index, self.T)  # (B, K+1): teacher anchor
            z = self._normalizers(out_s, out_t)  # (2,)
            loss = nce_loss(out_s / z[0], self.num_samples) + nce_loss(out_t / z[1], self.num_samples)
            self._update_memory(idx, v_s.detach(), v_t.detach())
        return loss

    @torch.no_grad()
    def _update_memory(self, idx: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """Apply the previous step's momentum update, then keep this step's (all ranks') as pending."""
        if self._pending is not None:
            p_idx, p_s, p_t = (t.to(self.memory_s.device) for t in self._pending)
            self.memory_s = momentum_update(self.memory_s, p_idx, p_s, self.nce_m)
            self.memory_t = momentum_update(self.memory_t, p_idx, p_t, self.nce_m)
        self._pending = gather_across_ranks(idx, v_s, v_t)  # type: ignore[assignment]  # three tensors in, three out

    def get_extra_state(self) -> dict[str, Any]:
        """The pending memory update (checkpointed, so a resumed run applies it)."""
        if self._pending is None:
            return {"pending": None}
        return {"pending": [t.detach().clone() for t in self._pending]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pending = state.get("pending") if isinstance(state, dict) else None
        self._pending = tuple(pending) if pending is not None else None
        self._z_ready = False  # re-read z from the loaded buffer
