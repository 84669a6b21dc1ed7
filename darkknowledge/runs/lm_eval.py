"""Held-out measures of a language-model student beyond perplexity: its KL to the teacher, its text.

The KL is the registered ``fkl`` loss (``KL(p_t || p_s)`` per token, averaged over the held-out
target positions) read against a dense cache of the teacher's held-out log-probabilities, so it is
the same equation the students are trained with, and the teacher does not run again per student.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.lm.models import generate, lazy_logits
from darkknowledge.lm.tokens import TokenBlocks
from darkknowledge.losses import create_loss
from darkknowledge.losses.base import Outputs


@torch.no_grad()
def teacher_student_kl(
    student: nn.Module, cache: Any, blocks: TokenBlocks, device: torch.device, batch_size: int = 8
) -> float:
    """Mean ``KL(p_teacher || p_student)`` per held-out target token (nats).

    Args:
        student: The trained causal LM.
        cache: A dense token cache of the teacher over ``blocks`` (``cache.targets(idx)`` gives
            ``(b, L, V)`` log-probabilities).
        blocks: The held-out blocks the cache covers, in its order.
        device: Where the student runs.
        batch_size: Blocks per forward.
    """
    fkl = create_loss("fkl")
    was = student.training
    student.eval().to(device)
    total, count = 0.0, 0
    try:
        for start in range(0, len(blocks), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(blocks)))  # (b,)
            x, y = blocks.x[idx].to(device), blocks.y[idx].to(device)  # (b, L) each
            n = int((y != UNLABELED).sum())
            if n == 0:
                continue
            teacher = cache.targets(idx, device)  # (b, L, V) dense log-probabilities
            batch = Batch(x, y, idx.to(device))
            value = fkl(Outputs(None, tokens=lazy_logits(student, x)), Outputs(logits=teacher), batch)
            total += float(value) * n
            count += n
    finally:
        student.train(was)
    return total / max(count, 1)


def generations(
    models: dict[str, nn.Module], tokenizer: Any, prompts: list[str], max_new_tokens: int, device: torch.device
) -> dict[str, list[str]]:
    """Greedy continuations of the same prompts by each model, by name."""
    out = {}
    for name, model in models.items():
        model.to(device)
        out[name] = generate(model, tokenizer, prompts, max_new_tokens)
    return out
