"""Tf-KD's virtual teacher: a hand-made distribution from the label, no network.

Yuan, Tay, Li, Wang & Feng, "Revisiting Knowledge Distillation via Label Smoothing
Regularization", CVPR 2020 (arXiv:1909.11723), Sec. 5 (Tf-KD_reg). The virtual teacher puts
probability ``a`` on the correct class and spreads the rest uniformly::

    p^d(k) = a                 if k == y
             (1 - a) / (K - 1)  otherwise

The official code (yuanli2333/Teacher-free-Knowledge-Distillation, ``loss_kd_regularization``)
softens it by treating ``p^d`` as logits: ``p^d_T = softmax(p^d / T)`` (with ``T = 20``,
``a = 0.99``, K = 10 close to uniform: 0.105 on the correct class), and matches the student's
*unsoftened* prediction to it. As a teacher it gives the logits ``log p^d_T``, so a loss at
temperature 1 sees exactly ``p^d_T``: Tf-KD_reg's term is ``kd`` with ``T: 1, alpha: 1``.
An unlabelled sample has no virtual teacher: it gets the student's own prediction (detached),
which teaches it nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses.base import Outputs, class_logits
from darkknowledge.teachers.base import Teacher, Views


def virtual_teacher(labels: torch.Tensor, num_classes: int, a: float, T: float) -> torch.Tensor:
    """The softened virtual teacher ``softmax(p^d / T)`` of the official code.

    Args:
        labels: ``(B,)`` classes; ``-1`` rows (unlabelled) get the uniform distribution.
        num_classes: K >= 2.
        a: Probability of the correct class in ``p^d``, in ``(0, 1)``.
        T: Temperature > 0 applied to ``p^d`` as if it were logits.

    Returns:
        ``(B, K)`` distributions (rows sum to 1).
    """
    if num_classes < 2:
        raise ConfigError(f"tfkd needs at least 2 classes (got {num_classes})")
    labelled = labels != UNLABELED  # (B,)
    p_d = torch.full((labels.shape[0], num_classes), (1.0 - a) / (num_classes - 1), device=labels.device)  # (B, K)
    p_d.scatter_(1, labels.clamp(min=0)[:, None], a)
    p_d = torch.where(labelled[:, None], p_d, torch.zeros_like(p_d))  # unlabelled: uniform after softmax
    return F.softmax(p_d / T, dim=-1)  # (B, K)


class Virtual(Teacher):
    """The virtual teacher of the labels (logits ``log p^d_T``; no features).

    Args:
        a: Probability of the correct class before softening.
        T: The temperature that softens ``p^d`` (official CIFAR-100 setting: 20).
        view: The student's view (its class count, and its own prediction for unlabelled rows).
    """

    def __init__(self, a: float = 0.99, T: float = 20.0, view: str = "student") -> None:
        super().__init__()
        self.a, self.T, self.view = a, T, view
        self.name = "virtual"

    @property
    def kind(self) -> str:
        return f"Tf-KD's virtual teacher (a={self.a}, T={self.T}; made from the label, no network)"

    def __call__(self, batch: Batch, views: Views | None = None) -> Outputs:
        assert views is not None
        own = class_logits(views[self.view], "the virtual teacher").detach()  # (B, K)
        q = virtual_teacher(batch.y, own.shape[-1], self.a, self.T)  # (B, K)
        logits = torch.where((batch.y != UNLABELED)[:, None], q.log().to(own.dtype), own)  # (B, K)
        return Outputs(logits=logits)
