"""Generalized distillation (Lopez-Paz et al. 2016): the teacher softened, the student not."""

from __future__ import annotations

import math

import pytest
import torch

from darkknowledge.losses import create_loss
from darkknowledge.losses.base import Outputs
from darkknowledge.losses.gd import generalized_distillation_loss
from darkknowledge.losses.kd import kd_soft_loss


def test_known_value_on_two_classes() -> None:
    zs = torch.tensor([[0.0, math.log(3.0)]])  # softmax -> (1/4, 3/4)
    zt = torch.tensor([[0.0, 2.0 * math.log(3.0)]])  # softmax(z / 2) -> (1/4, 3/4)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # CE(s, p_s) with s = p_s: the entropy
    assert generalized_distillation_loss(zs, zt, T=2.0).item() == pytest.approx(expected, rel=1e-6)
    assert generalized_distillation_loss(zs, zt, T=2.0, t2=True).item() == pytest.approx(4 * expected, rel=1e-6)


def test_student_is_not_tempered_unlike_kd() -> None:
    torch.manual_seed(0)
    zs, zt = torch.randn(6, 5), torch.randn(6, 5)
    T = 4.0
    s = torch.softmax(zt / T, -1)
    manual = -(s * torch.log_softmax(zs, -1)).sum(-1).mean()
    assert generalized_distillation_loss(zs, zt, T).item() == pytest.approx(manual.item(), rel=1e-6)
    # KD's soft term tempers both sides: a different objective at T != 1, the same minimiser at T = 1
    assert not math.isclose(kd_soft_loss(zs, zt, T).item() / T**2, manual.item(), rel_tol=1e-3)
    at_one = -(torch.softmax(zt, -1) * torch.log_softmax(zt, -1)).sum(-1).mean()  # entropy of p_t
    assert (generalized_distillation_loss(zs, zt, 1.0) - at_one).item() == pytest.approx(
        kd_soft_loss(zs, zt, 1.0).item(), rel=1e-5
    )  # CE = H(p_t) + KL at T = 1


def test_gradient_reaches_the_student_only_and_registered_term_runs() -> None:
    torch.manual_seed(1)
    zs = torch.randn(4, 3, requires_grad=True)
    zt = torch.randn(4, 3, requires_grad=True)
    loss = create_loss("gd", T=10.0, t2=True)
    value = loss(Outputs(logits=zs), Outputs(logits=zt), None)
    value.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0 and zt.grad is None
    # its minimiser is the teacher's soft labels: the gradient vanishes at log p_s = log s (+ const)
    zs2 = (zt.detach() / 10.0).clone().requires_grad_(True)
    generalized_distillation_loss(zs2, zt.detach(), 10.0).backward()
    assert zs2.grad.abs().max().item() < 1e-6


def test_empty_batch_is_zero() -> None:
    assert generalized_distillation_loss(torch.zeros(0, 3), torch.zeros(0, 3), 2.0).item() == 0.0
