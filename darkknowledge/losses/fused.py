"""Fast paths of hot-loop losses: the same values and gradients as the textbook functions, in fewer ops.

A tiny student's step on a CPU lasts about a millisecond, and the KD loss's two dozen tensor
ops of a few microseconds each are a quarter of it. The textbook functions
(:func:`darkknowledge.losses.kd.kd_loss`) read as the paper's equation; the functions here
compute the same thing with fewer ops, and the losses' ``forward`` calls them while
``ENABLED`` (``DK_FUSED=0`` in the environment, or ``fused.ENABLED = False``, switches back to
the textbook path, e.g. to measure the gain: ``benchmarks/speed.py``'s ``dk_kd_cached_textbook``).
Tested against the textbook functions for value and gradient (fp32, fp64, half precision).

* The KL sum and the cross-entropy sum of a labelled batch are added with one ``add`` and
  scaled once.
* Constant factors are 0-d tensors made once (:mod:`darkknowledge.losses.scalar`): ``z * 0.25``
  wraps the float into a new tensor on every call.
* Cross-entropy skips counting labels when the loader knows every sample is labelled.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from darkknowledge.losses.ce import cross_entropy
from darkknowledge.losses.scalar import scalar_for

ENABLED = os.environ.get("DK_FUSED", "1") != "0"
"""Whether losses take these fast paths (default on)."""


def soft_log_probs(logits: torch.Tensor, T: float) -> torch.Tensor:
    """``log softmax(z / T)`` (float32 for half-precision logits), the 1/T a 0-d constant."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if T != 1.0:
        logits = logits * scalar_for(1.0 / T, logits)  # (B, K); a 0-d constant, no per-call wrap
    return torch.log_softmax(logits, dim=-1)


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """``sum_b KL(p_t^T || p_s^T)`` over the batch (not averaged, not times ``T^2``).

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``; a constant unless it requires grad.
        T: Temperature > 0.
    """
    log_p_s = soft_log_probs(student_logits, T)  # (B, K)
    log_p_t = soft_log_probs(teacher_logits, T)  # (B, K)
    return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)  # sum p_t (log p_t - log p_s)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    T: float,
    alpha: float,
    all_labeled: bool = False,
) -> torch.Tensor:
    """:func:`darkknowledge.losses.kd.kd_loss` in fewer ops.

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``; treated as a constant.
        labels: ``(B,)``; ``-1`` marks an unlabelled sample (soft term only).
        T: Temperature > 0.
        alpha: Weight of the soft term, in ``[0, 1]``.
        all_labeled: The caller knows no label is -1 (``Batch.labeled``).
    """
    n = student_logits.shape[0]
    kl = kl_sum(student_logits, teacher_logits, T)
    if alpha < 1.0 and all_labeled and n:
        ce = F.cross_entropy(student_logits, labels, reduction="sum")  # sum over the batch
        mixed = torch.add(ce, kl, alpha=alpha * T * T / (1.0 - alpha))  # ce + a T^2/(1-a) * kl
        return mixed * scalar_for((1.0 - alpha) / n, student_logits)
    soft = kl * scalar_for(alpha * T * T / max(1, n), student_logits)
    if alpha >= 1.0:
        return soft
    return soft + (1.0 - alpha) * cross_entropy(student_logits, labels, all_labeled=all_labeled)
