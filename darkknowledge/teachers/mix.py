"""Mixing several teachers: per-teacher weights and mixed soft labels (pure functions).

Every function is pure (tensors in, tensors out). ``K`` below is the number of *classes*,
``N`` the number of *teachers* and ``B`` the batch size.

* :func:`mixture_logits`: the logits of a mixture of softened teacher distributions,
  ``z_mix = T * log(sum_i w_i(x) * softmax(z_i / T))``, so that ``softmax(z_mix / T)`` is
  exactly the mixture ``sum_i w_i(x) p_i^T`` (any response loss of the catalog that softens
  the teacher logits at ``T`` then sees the mixed distribution).
* :func:`fixed_weights`: user weights normalised to sum 1.
* :func:`entropy_weights`: EBKD, Kwon, Na, Lee & Kim, "Adaptive Knowledge Distillation Based
  on Entropy", ICASSP 2020: ``w_i = (1 - H_i / sum_j H_j) / (N - 1)`` per sample.
* :func:`ce_weights`: CA-MKD, Zhang, Chen & Wang, "Confidence-Aware Multi-Teacher Knowledge
  Distillation", ICASSP 2022: ``w_i = (1 - softmax_i(L_CE^1..N)) / (N - 1)`` with
  ``L_CE^i = CE(z_i, y)`` per sample (teachers close to the one-hot label weigh more).
* :func:`correct_weights`: uniform over the teachers whose argmax equals the label.

The two paper formulas were checked against the CA-MKD authors' code (Rorozhl/CA-MKD,
``helper/loops.py``, which also implements EBKD).

Unlabelled samples (``y == -1``, the transfer set) get uniform weights from the label-based
rules (:func:`ce_weights`, :func:`correct_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from darkknowledge.errors import ConfigError, ShapeError


def stack_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack teacher logits ``N x (B, K)`` into ``(N, B, K)`` float32 (fp16/bf16 promoted).

    Raises:
        ShapeError: The teachers' logits differ in shape (batch or class count).
    """
    shapes = [tuple(z.shape) for z in logits]
    if not shapes or any(s != shapes[0] or len(s) != 2 for s in shapes):
        raise ShapeError(f"multi_teacher: every teacher must give (B, K) logits of one shape; got {shapes}")
    dtype = torch.promote_types(logits[0].dtype, torch.float32)
    return torch.stack([z.to(dtype) for z in logits])  # (N, B, K)


def mixture_logits(logits: torch.Tensor, weights: torch.Tensor, T: float) -> torch.Tensor:
    """Logits whose softmax at temperature ``T`` is the weighted mixture of the softened teachers.

    ``z_mix[b] = T * log(sum_i w[i, b] * softmax(z[i, b] / T))``, computed with ``logsumexp``.
    Since the mixture sums to 1 over classes, ``softmax(z_mix / T) == sum_i w_i p_i^T`` exactly.

    Args:
        logits: ``(N, B, K)`` teacher logits (constants).
        weights: ``(N, B)`` per-sample weights, or ``(N,)`` per teacher; each column sums to 1.
        T: Temperature > 0 at which the distributions are mixed.

    Returns:
        ``(B, K)`` mixed logits.
    """
    if weights.dim() == 1:
        weights = weights[:, None].expand(logits.shape[0], logits.shape[1])  # (N, B)
    log_p = F.log_softmax(logits / T, dim=-1)  # (N, B, K)
    log_w = torch.log(weights.to(log_p.dtype))[..., None]  # (N, B, 1); log 0 = -inf drops a teacher
    return T * torch.logsumexp(log_w + log_p, dim=0)  # (B, K)


def fixed_weights(weights: Sequence[float], num_teachers: int, where: str = "scheme.params.weights") -> torch.Tensor:
    """User weights, checked and normalised to sum 1.

    Args:
        weights: One non-negative weight per teacher.
        num_teachers: ``N``.
        where: Config path for errors.

    Returns:
        ``(N,)`` float32 weights summing to 1.

    Raises:
        ConfigError: Wrong length, a negative weight, or all zero.
    """
    values = [float(w) for w in weights]
    if len(values) != num_teachers:
        raise ConfigError(
            f"{where}: got {len(values)} weights {values} for {num_teachers} teachers "
            f"(`teacher` then `teachers`); give exactly {num_teachers}"
        )
    if any(w < 0 for w in values) or sum(values) <= 0:
        raise ConfigError(f"{where}: weights must be >= 0 with a positive sum, got {values}")
    w = torch.tensor(values, dtype=torch.float32)  # (N,)
    return w / w.sum()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` over the last dim: ``(..., K) -> (...)``."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def entropy_weights(logits: torch.Tensor) -> torch.Tensor:
    """EBKD weights: ``w_i = (1 - H_i / sum_j H_j) / (N - 1)``, per sample (``T = 1``).

    A confident (low-entropy) teacher weighs more. Kwon et al. (ICASSP 2020) weigh each
    teacher's KD term by ``1 - H_i / sum_j H_j``; the ``1 / (N - 1)`` makes the weights sum to 1.
    When every teacher is certain (``sum_j H_j = 0``) the weights are uniform.

    Args:
        logits: ``(N, B, K)`` teacher logits, ``N >= 2``.

    Returns:
        ``(N, B)`` weights, each column summing to 1.
    """
    n = logits.shape[0]
    h = entropy(logits)  # (N, B)
    total = h.sum(dim=0, keepdim=True)  # (1, B)
    share = torch.where(total > 0, h / total.clamp_min(1e-12), torch.full_like(h, 1.0 / n))
    return (1.0 - share) / (n - 1)


def ce_weights(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CA-MKD weights (Zhang et al., ICASSP 2022): ``(1 - softmax_i(CE_i)) / (N - 1)``.

    ``CE_i = CE(z_i, y)`` per sample; the softmax runs over the teachers, so a teacher whose
    prediction is close to the one-hot label (small CE) weighs more. Unlabelled samples
    (``y == -1``) get ``1 / N``.

    Args:
        logits: ``(N, B, K)`` teacher logits, ``N >= 2``.
        labels: ``(B,)`` labels, ``-1`` = unlabelled.

    Returns:
        ``(N, B)`` weights, each column summing to 1.
    """
    n, b, k = logits.shape
    safe = labels.clamp_min(0)
    ce = F.cross_entropy(logits.reshape(n * b, k), safe.repeat(n), reduction="none").view(n, b)  # (N, B)
    w = (1.0 - torch.softmax(ce, dim=0)) / (n - 1)  # (N, B)
    return torch.where(labels[None, :] >= 0, w, torch.full_like(w, 1.0 / n))


def correct_weights(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Uniform weight over the teachers whose argmax is the label, per sample.

    Samples that no teacher classifies correctly, and unlabelled ones (``y == -1``), get ``1 / N``.

    Args:
        logits: ``(N, B, K)`` teacher logits.
        labels: ``(B,)`` labels, ``-1`` = unlabelled.

    Returns:
        ``(N, B)`` weights, each column summing to 1.
    """
    n = logits.shape[0]
    correct = (logits.argmax(dim=-1) == labels[None, :]).to(logits.dtype)  # (N, B); y = -1 never matches
    count = correct.sum(dim=0, keepdim=True)  # (1, B)
    return torch.where(count > 0, correct / count.clamp_min(1.0), torch.full_like(correct, 1.0 / n))


CONFIDENCE_RULES = ("ce", "entropy", "correct")


def confidence_weights(logits: torch.Tensor, labels: torch.Tensor, rule: str) -> torch.Tensor:
    """Per-sample teacher weights ``(N, B)`` by ``rule``: ``ce`` (CA-MKD), ``entropy`` (EBKD), ``correct``."""
    if rule == "ce":
        return ce_weights(logits, labels)
    if rule == "entropy":
        return entropy_weights(logits)
    if rule == "correct":
        return correct_weights(logits, labels)
    raise ConfigError(f"scheme.params.confidence: unknown rule {rule!r}; valid: {', '.join(CONFIDENCE_RULES)}")


def draw_teacher(seed: int, step: int, num_teachers: int) -> int:
    """The teacher used at training step ``step`` by ``random`` aggregation (Fukuda et al.,
    Interspeech 2017: teacher labels switched per mini-batch).

    Derived from ``(seed, step)`` alone, so every DDP rank draws the same teacher and a resumed
    run continues the same sequence. Uniform over ``range(num_teachers)``.
    """
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))
    return int(torch.randint(num_teachers, (1,), generator=g))
