"""chunked_sum: the fused path (gradients taken in the forward) and the recompute path give the
unchunked value and gradients, for the rows and for the head's parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.losses.token_chunks import _FusedChunks, chunked_sum

N, D, V = 23, 6, 17


def _setup(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(D, V)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g))
        head.bias.copy_(torch.randn(V, generator=g))
    x = torch.randn(N, D, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    teacher = torch.log_softmax(torch.randn(N, V, generator=g), -1)
    return head, x, targets, teacher


def _grads(head: nn.Module, x: torch.Tensor, make_fn, size: int | None, head_arg):
    head.zero_grad()
    rows = (x * 1.5).detach().requires_grad_(True)  # a leaf
    total = chunked_sum(make_fn(head), rows, torch.arange(N), size, head_arg(head))
    (total * 0.7).backward()  # a grad_output other than 1
    return total.detach(), rows.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()


def _ce(targets):
    def make(head):
        return lambda h, pos: F.cross_entropy(head(h), targets[pos], reduction="sum")

    return make


def _fkl(teacher):
    def make(head):
        def fn(h, pos):
            s = torch.log_softmax(head(h), -1)
            t = teacher[pos]
            return (t.exp() * (t - s)).sum()

        return fn

    return make


@pytest.mark.parametrize("loss", ["ce", "fkl"])
@pytest.mark.parametrize("size", [1, 5, 22])
@pytest.mark.parametrize("path", ["fused", "recompute"])
def test_chunked_equals_unchunked(loss: str, size: int, path: str) -> None:
    head, x, targets, teacher = _setup()
    make = _ce(targets) if loss == "ce" else _fkl(teacher)
    head_arg = (lambda h: h) if path == "fused" else (lambda h: lambda r: h(r))  # a plain callable: recompute
    want = _grads(head, x, make, None, head_arg)
    got = _grads(head, x, make, size, head_arg)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_path_is_taken_for_a_module_head(monkeypatch: pytest.MonkeyPatch) -> None:
    head, x, targets, _ = _setup()
    calls = []
    real = _FusedChunks.apply
    monkeypatch.setattr(_FusedChunks, "apply", lambda *a: calls.append(1) or real(*a))
    _grads(head, x, _ce(targets), 4, lambda h: h)
    assert calls == [1]
    _grads(head, x, _ce(targets), 4, lambda h: lambda r: h(r))
    assert calls == [1]  # a plain callable head: recomputed under checkpointing instead


def test_logit_rows_and_frozen_parts() -> None:
    """Logits rows (no head), a frozen head (only the rows get gradients), rows without grad."""
    _, _, targets, _ = _setup()
    logits = torch.randn(N, V, requires_grad=True)

    def fn(z, pos):
        return F.cross_entropy(z, targets[pos], reduction="sum")

    chunked_sum(fn, logits, torch.arange(N), 4).backward()
    g = logits.grad.clone()
    logits.grad = None
    fn(logits, torch.arange(N)).backward()
    torch.testing.assert_close(g, logits.grad)

    head, x, _, _ = _setup(1)
    head.requires_grad_(False)
    rows = x.clone().requires_grad_(True)
    chunked_sum(_ce(targets)(head), rows, torch.arange(N), 4, head).backward()
    assert rows.grad is not None and head.weight.grad is None

    head.requires_grad_(True)
    total = chunked_sum(_ce(targets)(head), x, torch.arange(N), 4, head)  # rows are data, the head learns
    total.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_without_grad_is_the_plain_sum() -> None:
    head, x, targets, _ = _setup()
    fn = _ce(targets)(head)
    with torch.no_grad():
        got = chunked_sum(fn, x, torch.arange(N), 4, head)
        want = fn(x, torch.arange(N))
    torch.testing.assert_close(got, want)
    assert not got.requires_grad
