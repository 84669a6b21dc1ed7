"""A causal LM's per-token distribution when its ``(B, L, V)`` logits are not materialised.

Two forms stand in for a full logits tensor:

* :class:`LazyLogits`: the final hidden states ``(B, L, d)`` and the output head; a loss turns
  the rows it needs into logits a chunk at a time (``head(hidden[rows]) -> (n, V)``), so the
  ``(B, L, V)`` float32 tensor never exists at once.
* :class:`SparseTargets`: a teacher's distribution stored sparsely per token, as read from a
  sequence cache. ``ids`` are token ids with the teacher's exact log-probabilities ``logp``
  (at temperature ``T``); ``tail`` is the log of the probability mass outside ``ids``. With
  ``weights`` (random-sampling KD) the ids were drawn from the teacher with replacement and
  ``weights`` are the draw counts over the number of draws: ``sum_i w_i f(i)`` is an unbiased
  estimate of ``E_{i ~ p_t} f(i)`` (Anshumann et al., "Sparse Logit Sampling: Accelerating
  Knowledge Distillation in LLMs", ACL 2025). Unused slots (fewer distinct draws than slots)
  have ``logp = -inf`` and ``weights = 0``.

Rows are tokens: ``(N, k)`` tensors for ``N`` positions (flattened ``B * L``), so a loss can
index the positions it keeps (``targets.rows(keep)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from darkknowledge.errors import ConfigError, ShapeError

SPARSE_KINDS = ("topk", "sampled")


@dataclass
class LazyLogits:
    """Logits given as hidden states and the output head.

    Attributes:
        hidden: Final hidden states ``(B, L, d)`` (after the model's last norm).
        head: Maps ``(n, d)`` hidden rows to ``(n, V)`` logits (the LM head, with grad where the
            model is trained).
        vocab: ``V``.
    """

    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]
    vocab: int

    @property
    def positions(self) -> tuple[int, ...]:
        """The leading shape ``(B, L)``."""
        return tuple(self.hidden.shape[:-1])

    def rows(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden rows ``(n, d)`` of the kept positions (``keep``: flat indices ``(n,)``; None: all)."""
        flat = self.hidden.reshape(-1, self.hidden.shape[-1])  # (B*L, d)
        return flat if keep is None else flat.index_select(0, keep)

    def logits(self) -> torch.Tensor:
        """All logits ``(B, L, V)`` at once (the plain path; materialises the full tensor)."""
        return self.head(self.rows()).reshape(*self.positions, self.vocab)


@dataclass
class SparseTargets:
    """A teacher's per-token distribution in sparse form (see the module docstring).

    Attributes:
        ids: Token ids ``(N, k)`` int64.
        logp: The teacher's log-probabilities of ``ids`` at temperature ``T`` ``(N, k)`` float32;
            ``-inf`` in unused slots.
        tail: ``log(1 - sum exp(logp))`` per row ``(N,)``: the mass outside ``ids`` (``-inf`` when
            none is left).
        weights: Sampled targets only: draw counts / draws ``(N, k)`` (rows sum to 1); None for top-k.
        T: Temperature at which ``logp`` was computed.
        vocab: Vocabulary size ``V`` of the teacher.
        kind: ``"topk"`` or ``"sampled"``.
        positions: Leading shape the rows flatten (e.g. ``(B, L)``); ``(N,)`` when unknown.
    """

    ids: torch.Tensor
    logp: torch.Tensor
    tail: torch.Tensor
    weights: torch.Tensor | None
    T: float
    vocab: int
    kind: str = "topk"
    positions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in SPARSE_KINDS:
            raise ConfigError(f"sparse targets kind {self.kind!r} is not one of {SPARSE_KINDS}")
        if self.ids.ndim != 2 or self.logp.shape != self.ids.shape or self.tail.shape != self.ids.shape[:1]:
            raise ShapeError(
                f"sparse targets need ids and logp (N, k) and tail (N,); got ids {tuple(self.ids.shape)}, "
                f"logp {tuple(self.logp.shape)}, tail {tuple(self.tail.shape)}"
            )
        if (self.weights is None) != (self.kind == "topk"):
            raise ConfigError(
                f"sparse targets of kind {self.kind!r} {'need' if self.kind == 'sampled' else 'take no'} weights"
            )
        if not self.positions:
            self.positions = (int(self.ids.shape[0]),)

    @property
    def k(self) -> int:
        """Slots per token."""
        return int(self.ids.shape[1])

    def rows(self, keep: torch.Tensor) -> SparseTargets:
        """The targets of the kept flat positions ``keep`` ``(n,)``."""
        w = None if self.weights is None else self.weights.index_select(0, keep)
        return SparseTargets(
            self.ids.index_select(0, keep),
            self.logp.index_select(0, keep),
            self.tail.index_select(0, keep),
            w,
            self.T,
            self.vocab,
            self.kind,
        )

    def to(self, device: torch.device | str) -> SparseTargets:
        """The same targets on ``device``."""
        w = None if self.weights is None else self.weights.to(device)
        return SparseTargets(
            self.ids.to(device),
            self.logp.to(device),
            self.tail.to(device),
            w,
            self.T,
            self.vocab,
            self.kind,
            self.positions,
        )

    def check_vocab(self, vocab: int, who: str = "student") -> None:
        """Raise a clear error when the ``who`` model's vocabulary differs from the teacher's."""
        if vocab != self.vocab:
            raise ShapeError(
                f"the {who} predicts {vocab} tokens but the teacher's targets cover a vocabulary of "
                f"{self.vocab}: teacher and student must share one tokenizer (vocabulary mismatch)"
            )


def tail_log_mass(logp: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum_k exp(logp))`` per row of ``logp`` ``(N, k)`` -> ``(N,)``, clamped at ``-inf``.

    Computed as ``log1p(-exp(logsumexp))`` (accurate for a small listed mass) or
    ``log(-expm1(logsumexp))`` (accurate when the listed mass is close to 1).
    """
    listed = torch.logsumexp(logp.float(), dim=-1).clamp(max=0.0)  # (N,) log of the listed mass
    near_one = listed > -math.log(2.0)
    out = torch.where(near_one, torch.log(-torch.expm1(listed)), torch.log1p(-torch.exp(listed)))
    return out  # (N,); -inf where the listed ids hold all the mass


def topk_targets(logits: torch.Tensor, k: int, T: float = 1.0) -> SparseTargets:
    """The top-``k`` log-probabilities of ``logits`` ``(..., V)`` at temperature ``T``, plus the tail."""
    vocab = int(logits.shape[-1])
    if not 1 <= k <= vocab:
        raise ConfigError(f"top-k size k={k} must be between 1 and the vocabulary size {vocab}")
    flat = logits.reshape(-1, vocab).float()  # (N, V)
    logp = torch.log_softmax(flat / T, dim=-1)  # (N, V)
    top, ids = logp.topk(k, dim=-1)  # (N, k) each
    return SparseTargets(ids, top, tail_log_mass(top), None, T, vocab, "topk", tuple(logits.shape[:-1]))


def sampled_targets(
    logits: torch.Tensor, draws: int, T: float = 1.0, generator: torch.Generator | None = None
) -> SparseTargets:
    """``draws`` token ids per position sampled from ``softmax(logits / T)`` with replacement.

    Returns targets with one slot per draw: the distinct ids drawn (first), their exact teacher
    log-probabilities and their counts / ``draws`` as ``weights``; unused slots hold id 0,
    ``logp = -inf`` and weight 0.
    """
    vocab = int(logits.shape[-1])
    if draws < 1:
        raise ConfigError(f"sampled targets need draws >= 1 (got {draws})")
    flat = logits.reshape(-1, vocab).float()  # (N, V)
    logp_all = torch.log_softmax(flat / T, dim=-1)  # (N, V)
    drawn = torch.multinomial(logp_all.exp(), draws, replacement=True, generator=generator)  # (N, draws)
    drawn, _ = drawn.sort(dim=-1)  # (N, draws): equal ids are adjacent
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]  # (N, draws): the first draw of each distinct id
    counts = torch.zeros_like(drawn, dtype=torch.float32)
    slot = first.cumsum(dim=-1) - 1  # (N, draws): which distinct id each draw belongs to
    counts.scatter_add_(1, slot, torch.ones_like(counts))  # (N, draws): count per distinct slot
    ids = torch.zeros_like(drawn)
    ids.scatter_(1, slot, drawn)  # (N, draws): distinct ids in the first slots
    used = counts > 0
    logp = torch.where(used, logp_all.gather(1, ids), torch.full_like(counts, -math.inf))  # (N, draws)
    weights = counts / draws  # (N, draws), rows sum to 1
    return SparseTargets(ids, logp, tail_log_mass(logp), weights, T, vocab, "sampled", tuple(logits.shape[:-1]))
