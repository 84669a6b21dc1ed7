"""Sum a per-chunk loss over the rows of a sequence without keeping any chunk's ``(c, V)`` tensors.

The token losses (``losses/tokens.py``, the sequence form of ``ce``) reduce ``n`` rows (hidden
states ``(n, d)`` with an output head, or logits ``(n, V)``) a chunk at a time. Autograd would
keep every chunk's float32 ``(c, V)`` intermediates until the backward, which is the
``(B * L, V)`` memory chunking exists to avoid. Two ways out, one chosen per call:

* **fused** (a head that is an ``nn.Module``, or plain logits): each chunk's gradient is taken
  in the forward pass (``torch.autograd.grad`` of the chunk's sum with respect to its rows and
  the head's parameters) and accumulated, so the backward only scales the stored gradients by
  the incoming one. The ``(c, V)`` work runs once forward and once backward per chunk, as in
  the fused linear cross-entropy kernels (Liger Kernel, Hsu et al., 2024); what is kept is the
  gradient of the rows ``(n, d)`` and of the head's parameters (the size of the head).
* **recompute** (any other callable head): each chunk runs under activation checkpointing
  (``torch.utils.checkpoint``), so its forward runs again in the backward.

Both give the same value and gradients (tested). The fused path does not support a second
derivative through the loss (``create_graph``); without gradients (evaluation) both are a plain
loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

ChunkFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(rows (c, d|V), per_row (c,)) -> scalar``: the loss summed over one chunk (``per_row``: the
chunk's positions or targets)."""


class _FusedChunks(torch.autograd.Function):
    """``sum_chunks fn(rows[chunk], per_row[chunk])`` with the gradients taken in the forward."""

    @staticmethod
    def forward(
        ctx, fn: ChunkFn, size: int, per_row: torch.Tensor, rows: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        want_rows = ctx.needs_input_grad[3]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[4:], strict=True) if need]
        grad_rows = torch.zeros_like(rows) if want_rows else None  # (n, d|V)
        grad_params = [torch.zeros_like(p) for p in wanted]
        total = torch.zeros(
            (), dtype=torch.float64 if rows.dtype == torch.float64 else torch.float32, device=rows.device
        )
        for start in range(0, rows.shape[0], size):
            with torch.enable_grad():
                chunk = rows[start : start + size].detach().requires_grad_(want_rows)  # (c, d|V)
                value = fn(chunk, per_row[start : start + size])  # scalar
                inputs = ([chunk] if want_rows else []) + wanted
                grads = (
                    torch.autograd.grad(value, inputs, allow_unused=True)
                    if inputs and value.requires_grad
                    else [None] * len(inputs)
                )
            if grad_rows is not None:  # want_rows
                g, grads = grads[0], grads[1:]
                if g is not None:
                    grad_rows[start : start + size] = g
            for acc, g in zip(grad_params, grads, strict=True):
                if g is not None:
                    acc.add_(g)
            total = total + value.detach()
        ctx.want = (want_rows, list(ctx.needs_input_grad[4:]))
        ctx.save_for_backward(*([grad_rows] if want_rows else []), *grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        want_rows, want_params = ctx.want
        saved = list(ctx.saved_tensors)
        grad_rows = saved.pop(0) * grad_out if want_rows else None
        grad_params = [saved.pop(0) * grad_out if need else None for need in want_params]
        return (None, None, None, grad_rows, *grad_params)


def chunked_sum(
    fn: ChunkFn,
    rows: torch.Tensor,
    per_row: torch.Tensor,
    size: int | None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``sum over chunks of fn(rows[chunk], per_row[chunk])``, keeping no chunk's ``(c, V)`` tensors.

    Args:
        fn: The loss summed over one chunk; it applies ``head`` to hidden rows itself.
        rows: ``(n, d)`` hidden rows (with ``head``) or ``(n, V)`` logits.
        per_row: ``(n,)`` a value per row passed on to ``fn`` with its chunk (flat positions, targets).
        size: Rows per chunk; None or ``>= n``: one call of ``fn`` on all rows, no chunking.
        head: The output head ``fn`` applies: an ``nn.Module`` (its parameters get their gradients
            on the fused path) or another callable (recompute path); None for logits rows.

    Returns:
        Scalar, the sum over all rows.
    """
    n = rows.shape[0]
    if not size or size >= n or not torch.is_grad_enabled():
        if not size or size >= n:
            return fn(rows, per_row)
        return sum(
            (fn(r, p) for r, p in zip(torch.split(rows, size), torch.split(per_row, size), strict=True)),
            start=torch.zeros((), device=rows.device),
        )
    if head is None or isinstance(head, nn.Module):
        params = [p for p in head.parameters() if p.requires_grad] if isinstance(head, nn.Module) else []
        return _FusedChunks.apply(fn, size, per_row, rows, *params)
    total = None
    for r, p in zip(torch.split(rows, size), torch.split(per_row, size), strict=True):
        part = checkpoint(fn, r, p, use_reentrant=False)
        total = part if total is None else total + part
    assert total is not None  # size < n: at least one chunk
    return total
