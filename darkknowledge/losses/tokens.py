"""Token-level divergences between a student's and a teacher's next-token distributions.

The shared machinery of the token losses (``fkl``, ``rkl``, ``jsd``, ``skew_fkl``, ``skew_rkl``,
``tv``). Each method is a pure function ``divergence(s_logp, t_logp) -> (n,)`` of two rows of
log-probabilities ``(n, m)`` over their last dim; this module feeds it, so one function serves
every form a distribution comes in:

* the student: a tensor of logits ``(..., V)`` (``(B, K)`` for a classifier, ``(B, L, V)`` for an
  LM) or :class:`~darkknowledge.lm.targets.LazyLogits` (hidden states and the output head);
* the teacher: a tensor of logits or log-probabilities (any float dtype, e.g. fp16 log-probs
  read from a dense cache: log-probs are valid logits), LazyLogits, or
  :class:`~darkknowledge.lm.targets.SparseTargets` (top-k or sampled ids with exact log-probs).

Per token, both models' logits are divided by ``T`` before ``log_softmax``. There is no ``T^2``
factor: the LM distillation papers these losses come from (GKD, Agarwal et al. ICLR 2024;
DistiLLM, Ko et al. ICML 2024; MiniLLM, Gu et al. ICLR 2024) train at ``T = 1``, where the factor
is 1; scale the term with its ``weight`` instead.

Positions of a sequence (an LM's ``(B, L, V)`` logits or LazyLogits) are masked with the batch's
targets: rows where ``batch.y.reshape(-1) != -1`` count (``UNLABELED``; for an LM ``y`` is
``(B, L)`` next-token targets with -1 at padding and prompt tokens). The loss is the mean of the
per-token divergence over the kept positions (a zero still attached to the graph when none is
kept). On a classifier's logits ``(B, K)`` every sample counts, labelled or not (as in ``kd``: an
unlabelled transfer sample is taught by the teacher alone).

Chunking (``chunk_size`` tokens at a time, :func:`darkknowledge.losses.token_chunks.chunked_sum`):
each chunk's student log-probs are computed from its rows (the hidden rows and the head for
LazyLogits) and its gradient taken at once, so one chunk's ``(chunk, V)`` float32 tensors are
alive at a time; a LazyLogits teacher's chunk logits are computed under ``torch.no_grad()`` inside
the chunk. Chunked and unchunked agree in value and gradient.

Sparse teacher targets (``k`` slots per token): the divergence is taken between bucketed
distributions over ``k + 1`` buckets, the listed ids and the rest of the vocabulary:

    student: [log p_s(id_1), ..., log p_s(id_k), log(1 - sum_i p_s(id_i))]
    teacher: [logp_1, ..., logp_k, tail]

By the data-processing inequality this is a lower bound of the full divergence, equal to it when
the slots list the whole vocabulary. The student's rest bucket is ``log(1 - exp(a))`` of the
listed ids' log-mass ``a`` (:func:`log1mexp`, accurate at both ends, ``a`` capped at
:data:`REST_CEILING` so that a student holding all its mass on the listed ids keeps a finite
gradient): from the ``k`` gathered values, so a step reads the ``(n, V)`` log-probs once. A bucket the teacher
leaves empty (an unused slot, ``logp = -inf``; the rest when the slots cover all ``V`` ids) is
dropped for both models: it contributes exactly 0, forward and backward. A teacher tail that
rounded to ``-inf`` although ids are left over (a very peaked teacher) is read as
:data:`LOGP_FLOOR`, and so is any ``-inf`` log-probability of a dense distribution, so every
value a divergence sees is finite.

Sampled targets (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in
LLMs", ACL 2025): a loss may give an estimator of its own for them (the forward KL does:
``sum_i w_i (logp_t,i - log p_s,i)``, unbiased for ``KL(p_t || p_s)``); the other divergences use
the bucketed form over the sampled support (the distinct drawn ids plus the rest).

Contract of a ``divergence``: a sum over the last dim of per-bucket terms ``g(s_i, t_i)`` with
``g(x, x) = 0`` (true of every f-divergence); dropped buckets are passed as ``s_i = t_i = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.lm.targets import LazyLogits, SparseTargets
from darkknowledge.losses.base import DistillLoss, Needs, Outputs, SetupInfo
from darkknowledge.losses.token_chunks import chunked_sum

LOGP_FLOOR = math.log(torch.finfo(torch.float32).tiny)
"""The log-probability an ``-inf`` is read as (about -87.3: the smallest normal float32 mass)."""

DEFAULT_CHUNK: Literal["auto"] = "auto"
"""Chunk size by default: ``chunk_rows`` picks the tokens per chunk from the vocabulary."""

CHUNK_ELEMENTS = 4 * 2**20
"""``auto`` chunks hold at most this many logits (16 MiB in float32): well under glibc's 32 MiB
``mmap`` threshold, so a chunk's temporaries reuse freed heap memory instead of faulting fresh pages
in for every operation (timed on this project's 2-core CPU, 2026-12-04, a 64-d Llama student with a
49,152-token vocabulary, forward KL from top-64 targets, batch 16 x 128: 1.08 s per step with
128-token chunks, 2.0 s with 256- or 1,024-token ones)."""


def chunk_rows(chunk_size: int | Literal["auto"] | None, vocab: int) -> int | None:
    """Tokens per chunk: ``auto`` -> ``CHUNK_ELEMENTS // vocab`` (at least 1); None or 0 -> None (unchunked)."""
    if chunk_size == "auto":
        return max(1, CHUNK_ELEMENTS // max(1, vocab))
    return int(chunk_size) if chunk_size else None


Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(s_logp (n, m), t_logp (n, m)) -> (n,)``."""
SampledEstimator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(s_logp_at_ids (n, k), t_logp (n, k), weights (n, k), used (n, k) bool) -> (n,)``."""

Source = torch.Tensor | LazyLogits | SparseTargets


def kl_rows(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_i p_i (log p_i - log q_i)`` per row.

    Mind the order: the first argument is the distribution the expectation is taken under, so the
    forward KL of a ``divergence(s_logp, t_logp)`` is ``kl_rows(t_logp, s_logp)``
    (:func:`darkknowledge.losses.fkl.forward_kl`) and ``kl_rows(s_logp, t_logp)`` is the reverse KL.

    Args:
        p_logp: ``(n, m)`` finite log-probabilities of ``p``.
        q_logp: ``(n, m)`` finite log-probabilities of ``q``.

    Returns:
        ``(n,)``.
    """
    return (p_logp.exp() * (p_logp - q_logp)).sum(dim=-1)  # (n,)


def log_mixture(a_logp: torch.Tensor, b_logp: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w p_a + (1 - w) p_b)`` elementwise, for ``0 < w < 1``.

    Args:
        a_logp: ``(n, m)`` log-probabilities.
        b_logp: ``(n, m)`` log-probabilities.
        w: Weight of ``a`` in ``(0, 1)``.

    Returns:
        ``(n, m)``.
    """
    return torch.logaddexp(a_logp + math.log(w), b_logp + math.log1p(-w))  # (n, m)


def finite_logp(logp: torch.Tensor) -> torch.Tensor:
    """``logp`` with ``-inf`` read as :data:`LOGP_FLOOR` (other values unchanged)."""
    return torch.nan_to_num(logp, nan=math.nan, neginf=LOGP_FLOOR)  # one pass, no temporaries


REST_CEILING = -1e-6
"""The listed ids' log-mass is read at most this (a rest of at least ~1e-6): the rest bucket's log,
``log(1 - p)``, and its gradient stay finite when a confident student puts all its mass on them."""


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a <= 0``, accurate at both ends (Maechler 2012): ``log(-expm1(a))``
    near 0, ``log1p(-exp(a))`` below ``-log 2``; ``a`` is capped at :data:`REST_CEILING`."""
    a = a.clamp(max=REST_CEILING)
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def bucket_log_probs(s_logp: torch.Tensor, targets: SparseTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probabilities over the ``k + 1`` buckets of sparse targets.

    Args:
        s_logp: Student log-probabilities ``(n, V)`` at the targets' temperature.
        targets: The teacher's targets of the same ``n`` positions (``ids``/``logp`` ``(n, k)``).

    Returns:
        ``(s_b, t_b)``, each ``(n, k + 1)``: the listed ids then the rest of the vocabulary;
        buckets the teacher leaves empty hold 0 in both (see the module docstring).
    """
    dtype = s_logp.dtype
    t_logp = targets.logp.to(dtype)  # (n, k)
    used = t_logp > -math.inf  # (n, k): slots holding an id
    has_rest = used.sum(dim=-1) < targets.vocab  # (n,): some ids are not listed
    ids = torch.where(used, targets.ids, targets.ids[:, :1])  # (n, k): unused slots repeat slot 0's id
    s_ids = s_logp.gather(1, ids)  # (n, k)
    s_rest = log1mexp(torch.logsumexp(s_ids.masked_fill(~used, -math.inf), dim=-1))  # (n,): log(1 - listed mass)
    s_b = torch.cat([s_ids, s_rest[:, None]], dim=-1)  # (n, k + 1)
    t_b = torch.cat([t_logp, targets.tail.to(dtype)[:, None]], dim=-1)  # (n, k + 1)
    keep = torch.cat([used, has_rest[:, None]], dim=-1)  # (n, k + 1): buckets the teacher fills
    zero = torch.zeros((), dtype=dtype, device=s_logp.device)
    return torch.where(keep, finite_logp(s_b), zero), torch.where(keep, finite_logp(t_b), zero)


def _positions(source: Source) -> int:
    """How many token positions ``source`` covers."""
    if isinstance(source, LazyLogits):
        return math.prod(source.positions)
    if isinstance(source, SparseTargets):
        return int(source.ids.shape[0])
    return math.prod(source.shape[:-1])


def _vocab(source: Source) -> int:
    return source.vocab if isinstance(source, (LazyLogits, SparseTargets)) else int(source.shape[-1])


def check_sources(student: torch.Tensor | LazyLogits, teacher: Source, loss_name: str) -> None:
    """Raise ``ShapeError`` when student and teacher differ in vocabulary or in positions."""
    v_s, v_t = _vocab(student), _vocab(teacher)
    if v_s != v_t:
        raise ShapeError(
            f"loss {loss_name!r}: the student predicts {v_s} tokens but the teacher predicts {v_t} "
            "(vocabulary mismatch): teacher and student must share one tokenizer/class set"
        )
    n_s, n_t = _positions(student), _positions(teacher)
    if n_s != n_t:
        raise ShapeError(
            f"loss {loss_name!r}: the student's distribution covers {n_s} positions but the "
            f"teacher's covers {n_t}: both must come from the same batch"
        )


def log_softmax_at(z: torch.Tensor, T: float) -> torch.Tensor:
    """``log_softmax(z / T)`` over the last dim; at ``T = 1`` without the division (one ``(c, V)``
    pass fewer forward and backward: the common case of the LM losses)."""
    return F.log_softmax(z if T == 1 else z / T, dim=-1)


def _teacher_chunk(teacher: Source, rows: torch.Tensor, dtype: torch.dtype, T: float) -> torch.Tensor | SparseTargets:
    """The teacher's log-probabilities ``(c, V)`` (or its sparse targets) at flat positions ``rows``."""
    if isinstance(teacher, SparseTargets):
        return teacher.rows(rows)
    with torch.no_grad():
        if isinstance(teacher, LazyLogits):
            z = teacher.head(teacher.rows(rows))  # (c, V)
        else:
            z = teacher.index_select(0, rows)  # (c, V) of the flat (N, V) logits
        return log_softmax_at(z.to(dtype), T)  # (c, V)


def _chunk_sum(
    s_rows: torch.Tensor,
    rows: torch.Tensor,
    *,
    head: Callable[[torch.Tensor], torch.Tensor] | None,
    vocab: int,
    teacher: Source,
    divergence: Divergence,
    sampled: SampledEstimator | None,
    T: float,
) -> torch.Tensor:
    """Sum of the per-token divergence over one chunk.

    Args:
        s_rows: The chunk's student logits ``(c, V)``, or hidden rows ``(c, d)`` when ``head`` is set.
        rows: The chunk's flat positions ``(c,)`` (to read the teacher's).
    """
    z = s_rows if head is None else head(s_rows)  # (c, V)
    if z.shape[-1] != vocab:
        raise ShapeError(f"the student's head gives {z.shape[-1]} logits per token, expected its vocabulary {vocab}")
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    s_logp = log_softmax_at(z.to(dtype), T)  # (c, V)
    t = _teacher_chunk(teacher, rows, dtype, T)
    if isinstance(t, SparseTargets):
        if t.kind == "sampled" and sampled is not None:
            assert t.weights is not None  # sampled targets carry their draw weights
            used = t.logp > -math.inf  # (c, k)
            ids = torch.where(used, t.ids, t.ids[:, :1])  # (c, k)
            per_token = sampled(s_logp.gather(1, ids), t.logp.to(dtype), t.weights.to(dtype), used)  # (c,)
        else:
            per_token = divergence(*bucket_log_probs(s_logp, t))  # (c,)
    else:
        per_token = divergence(finite_logp(s_logp), finite_logp(t))  # (c,)
    return per_token.sum()


def token_divergence(
    student: torch.Tensor | LazyLogits,
    teacher: Source,
    y: torch.Tensor,
    divergence: Divergence,
    T: float = 1.0,
    chunk_size: int | Literal["auto"] | None = DEFAULT_CHUNK,
    sampled: SampledEstimator | None = None,
    loss_name: str = "token divergence",
) -> torch.Tensor:
    """Mean per-token ``divergence`` between student and teacher over the positions ``y`` keeps.

    Args:
        student: Logits ``(..., V)`` or LazyLogits over the same positions as ``y``.
        teacher: Logits/log-probs ``(..., V)`` (constant), LazyLogits (run without grad) or
            sparse targets, over the same positions.
        y: Targets, one entry per position; ``-1`` marks an ignored position of a sequence (a classifier's
            samples all count).
        divergence: ``(s_logp (n, m), t_logp (n, m)) -> (n,)``.
        T: Temperature > 0 dividing both models' logits; must equal sparse targets' ``T``.
        chunk_size: Tokens per chunk (None or 0: all kept tokens at once, no checkpointing; ``auto``:
            :func:`chunk_rows`).
        sampled: Estimator used instead of the bucketed divergence on sampled targets.
        loss_name: Named in errors.

    Returns:
        Scalar (float32, float64 for a float64 student).

    Raises:
        ShapeError: Vocabularies or positions differ.
        ConfigError: ``T`` differs from the temperature the sparse targets were made at.
    """
    check_sources(student, teacher, loss_name)
    if isinstance(teacher, SparseTargets) and not math.isclose(teacher.T, T, rel_tol=1e-6):
        raise ConfigError(
            f"loss {loss_name!r}: T={T} but the teacher's sparse targets hold log-probabilities at "
            f"T={teacher.T}; set the loss's T to {teacher.T} or rebuild the targets at T={T}"
        )
    n_all = _positions(student)
    if y.numel() != n_all:
        raise ShapeError(
            f"loss {loss_name!r}: the batch holds {y.numel()} targets but the student's distribution "
            f"covers {n_all} positions; y must have one entry per position (-1: ignored)"
        )
    head = student.head if isinstance(student, LazyLogits) else None
    flat = student.rows() if isinstance(student, LazyLogits) else student.reshape(-1, student.shape[-1])  # (N, d|V)
    if (
        isinstance(student, LazyLogits) or student.ndim > 2
    ):  # a sequence: ignored positions (padding, prompts) are masked out
        keep_mask = y.reshape(-1).to(flat.device) != UNLABELED  # (N,)
    else:  # a classifier's samples: every one is taught, labelled or not
        keep_mask = torch.ones(n_all, dtype=torch.bool, device=flat.device)  # (N,)
    n = int(keep_mask.sum())
    if n == 0:
        return flat.sum().float() * 0.0  # nothing kept: zero, attached to the graph
    keep = keep_mask.nonzero().squeeze(1)  # (n,)
    kept = flat if n == n_all else flat.index_select(0, keep)  # (n, d) or (n, V)
    if isinstance(teacher, SparseTargets):
        teacher = teacher.to(flat.device)
    elif isinstance(teacher, torch.Tensor):
        teacher = teacher.detach().reshape(-1, teacher.shape[-1])  # (N, V), a constant
    fn = partial(
        _chunk_sum, head=head, vocab=_vocab(student), teacher=teacher, divergence=divergence, sampled=sampled, T=T
    )
    total = chunked_sum(fn, kept, keep, chunk_rows(chunk_size, _vocab(student)), head)
    return total / n


class TokenDivergence(DistillLoss):
    """Base of the token-level divergences: subclasses give :meth:`divergence` (see the module docstring).

    Shapes: the student's logits ``(..., V)`` (``Outputs.logits``) or its LazyLogits
    (``Outputs.tokens``); the teacher's logits, LazyLogits or sparse targets; ``batch.y`` one entry
    per position, ``-1`` where a position is ignored.

    Args:
        T: Temperature dividing both models' logits (LM papers: 1; no ``T^2`` factor).
        chunk_size: Tokens per chunk (None or 0: unchunked; ``auto``: :func:`chunk_rows`).
    """

    knowledge = "response"
    needs_spec = Needs(teacher=True, teacher_logits=True)
    T: float

    def __init__(
        self,
        T: Annotated[float, Field(gt=0.0)] = 1.0,
        chunk_size: Annotated[int, Field(ge=0)] | Literal["auto"] | None = DEFAULT_CHUNK,
    ) -> None:
        super().__init__()
        self.T = T
        self.chunk_size = chunk_size

    def label(self) -> str:
        """The registry name (named in errors)."""
        return getattr(self, "registry_name", type(self).__name__)

    def divergence(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        """The per-token divergence ``(n, m), (n, m) -> (n,)``."""
        raise NotImplementedError

    def sampled_estimator(self) -> SampledEstimator | None:
        """An estimator of the divergence on sampled targets (None: the bucketed form)."""
        return None

    def distributions(self, student: Outputs, teacher: Outputs | None) -> tuple[torch.Tensor | LazyLogits, Source]:
        """The student's and the teacher's per-token distributions (``tokens``, else ``logits``)."""
        s = student.tokens if student.tokens is not None else student.logits
        if s is None or isinstance(s, SparseTargets):
            raise ShapeError(f"loss {self.label()!r} needs the student's logits or LazyLogits, got {type(s).__name__}")
        t = None if teacher is None else (teacher.tokens if teacher.tokens is not None else teacher.logits)
        if t is None:
            raise ShapeError(
                f"loss {self.label()!r} needs the teacher's logits, LazyLogits or sparse targets; the teacher gave none"
            )
        return s, t

    def setup(self, student: Outputs, teacher: Outputs | None, info: SetupInfo) -> None:
        check_sources(*self.distributions(student, teacher), self.label())

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> torch.Tensor:
        s, t = self.distributions(student, teacher)
        return token_divergence(
            s, t, batch.y, self.divergence, self.T, self.chunk_size, self.sampled_estimator(), self.label()
        )
