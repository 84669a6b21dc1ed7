"""Response-based (logit) methods: DKD, DIST, logit standardization, NKD."""

import math

import numpy as np
import pytest
import torch

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses import create_loss
from darkknowledge.losses.base import Outputs
from darkknowledge.losses.dist import dist_loss, inter_class_relation, intra_class_relation
from darkknowledge.losses.dkd import dkd_loss, dkd_parts
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.losses.logit_std import logit_std_loss, standardize_logits
from darkknowledge.losses.nkd import nkd_loss
from darkknowledge.losses.objective import Objective
from darkknowledge.models import create_model
from darkknowledge.schemes.offline import offline_task


def _logits(b: int, k: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(b, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ----------------------------------------------------------------------------- DKD
def test_dkd_eq1_kd_is_tckd_plus_weighted_nckd():
    """Zhao et al. 2022, Eq. 1: KD = TCKD + (1 - p_t^T) * NCKD, per sample."""
    s, t = _logits(7, 6, 0), _logits(7, 6, 1)
    target = torch.tensor([0, 5, 2, 2, 1, 4, 3])
    T = 3.0
    tckd, nckd = dkd_parts(s, t, target, T)
    p_t_teacher = torch.softmax(t / T, -1).gather(1, target[:, None]).squeeze(1)
    kd_per_sample = torch.stack([kd_soft_loss(s[i : i + 1], t[i : i + 1], T) for i in range(7)])
    assert torch.allclose(kd_per_sample, tckd + (1 - p_t_teacher) * nckd, atol=1e-10)
    # with alpha == beta == 1 DKD drops the (1 - p_t) weight, so it is >= KD
    assert dkd_loss(s, t, target, 1.0, 1.0, T) >= kd_soft_loss(s, t, T)


def test_dkd_matches_a_hand_loop_and_is_zero_for_identical_logits():
    s = torch.tensor([[1.0, 2.0, 0.5, -1.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 3.0, 1.0, 0.5]], dtype=torch.float64)
    y, T, alpha, beta = 1, 2.0, 0.7, 3.0
    p_s = [math.exp(v / T) for v in s[0].tolist()]
    p_t = [math.exp(v / T) for v in t[0].tolist()]
    p_s = [v / sum(p_s) for v in p_s]
    p_t = [v / sum(p_t) for v in p_t]
    b_s, b_t = [p_s[y], 1 - p_s[y]], [p_t[y], 1 - p_t[y]]
    tckd = sum(bt * math.log(bt / bs) for bt, bs in zip(b_t, b_s))
    others = [i for i in range(4) if i != y]
    q_s = [p_s[i] / (1 - p_s[y]) for i in others]
    q_t = [p_t[i] / (1 - p_t[y]) for i in others]
    nckd = sum(a * math.log(a / b) for a, b in zip(q_t, q_s))
    expected = (alpha * tckd + beta * nckd) * T * T
    got = dkd_loss(s, t, torch.tensor([y]), alpha, beta, T)
    assert abs(got.item() - expected) < 1e-10
    z = _logits(5, 10, 2)
    assert dkd_loss(z, z.clone(), torch.arange(5), 1.0, 8.0, 4.0).abs().item() < 1e-12


def test_dkd_unlabelled_samples_use_the_teacher_argmax():
    s, t = _logits(4, 5, 3).float(), _logits(4, 5, 4).float()
    y = torch.tensor([1, -1, 2, -1])
    filled = torch.where(y < 0, t.argmax(-1), y)
    loss = create_loss("dkd", alpha=1.0, beta=2.0, T=2.0)
    got = loss(Outputs(s), Outputs(t), Batch(torch.zeros(4, 1), y, torch.arange(4)))
    assert torch.allclose(got, dkd_loss(s, t, filled, 1.0, 2.0, 2.0))


def test_dkd_warmup_through_the_objective_schedule():
    """mdistiller's min(epoch / warmup, 1) ramp is the term's warmup_epochs."""
    obj = Objective.from_config({"ce": {}, "dkd": {"warmup_epochs": 20}})
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    batch = Batch(torch.zeros(6, 1), torch.tensor([0, 1, 2, 3, 0, 1]), torch.arange(6))
    for progress, w in ((0.0, 0.0), (5.0, 0.25), (20.0, 1.0), (29.0, 1.0)):
        total, terms = obj(Outputs(s), Outputs(t), batch, epoch_progress=progress)
        assert torch.allclose(total, terms["ce"] + w * terms["dkd"], atol=1e-6)
    with pytest.raises(ConfigError, match="losses.dkd.T"):
        create_loss("dkd", T=0)


# ----------------------------------------------------------------------------- DIST
def test_dist_matches_numpy_on_a_2x3_example():
    zs = np.array([[1.0, 2.0, 0.5], [0.2, -1.0, 1.5]])
    zt = np.array([[0.0, 3.0, 1.0], [1.0, 0.0, 2.0]])
    T, beta, gamma = 2.0, 1.5, 0.5

    def softmax(z):
        e = np.exp(z / T)
        return e / e.sum(1, keepdims=True)

    def pearson(u, v, eps=0.0):  # the authors' eps=1e-8 sits in the denominator
        u, v = u - u.mean(), v - v.mean()
        return (u * v).sum() / (np.linalg.norm(u) * np.linalg.norm(v) + eps)

    ys, yt = softmax(zs), softmax(zt)
    got = dist_loss(torch.tensor(zs), torch.tensor(zt), beta, gamma, T).item()
    for eps, tol in ((1e-8, 1e-10), (0.0, 1e-4)):
        inter = 1 - np.mean([pearson(ys[i], yt[i], eps) for i in range(2)])
        intra = 1 - np.mean([pearson(ys[:, j], yt[:, j], eps) for j in range(3)])
        assert abs(got - T**2 * (beta * inter + gamma * intra)) < tol
    # eps = 0 is numpy's Pearson correlation
    assert abs(pearson(ys[0], yt[0]) - np.corrcoef(ys[0], yt[0])[0, 1]) < 1e-12


def test_dist_inter_term_is_invariant_to_positive_affine_maps_of_rows():
    y_s = torch.softmax(_logits(5, 7, 5), -1)
    y_t = torch.softmax(_logits(5, 7, 6), -1)
    a = torch.rand(5, 1, dtype=torch.float64) * 3 + 0.1  # per-row positive scale
    b = torch.randn(5, 1, dtype=torch.float64)  # per-row shift
    c = torch.rand(5, 1, dtype=torch.float64) * 3 + 0.1
    base = inter_class_relation(y_s, y_t)
    assert torch.allclose(inter_class_relation(a * y_s + b, c * y_t - b), base, atol=1e-7)
    # the intra term reads columns: a per-row map changes it
    assert not torch.allclose(intra_class_relation(a * y_s + b, y_t), intra_class_relation(y_s, y_t), atol=1e-3)


def test_dist_identical_logits_give_zero():
    z = _logits(8, 10, 7)
    assert dist_loss(z, z.clone(), 1.0, 1.0, 1.0).abs().item() < 1e-6
    # only the eps = 1e-8 of the Pearson denominator stays (flatter columns at T = 4)
    assert dist_loss(z, z.clone(), 2.0, 2.0, 4.0).abs().item() < 1e-4


# ----------------------------------------------------------------------- logit_std
def test_logit_std_is_invariant_to_shift_and_positive_scale():
    s, t = _logits(6, 10, 8), _logits(6, 10, 9)
    base = logit_std_loss(s, t, 2.0)
    a = torch.rand(6, 1, dtype=torch.float64) * 5 + 0.2
    b = torch.randn(6, 1, dtype=torch.float64) * 10
    assert torch.allclose(logit_std_loss(s + b, t, 2.0), base, atol=1e-8)
    assert torch.allclose(logit_std_loss(s, t - b, 2.0), base, atol=1e-8)
    assert torch.allclose(logit_std_loss(a * s + b, (1 / a) * t + 3.0, 2.0), base, atol=1e-8)
    # identical up to a positive affine map -> 0; plain KD is not invariant
    assert logit_std_loss(s, s.clone(), 2.0).abs().item() < 1e-10
    assert logit_std_loss(3 * s + 1, s, 2.0).abs().item() < 1e-10
    assert kd_soft_loss(3 * s + 1, s, 2.0).item() > 0.1


def test_logit_std_matches_numpy_zscore_kd():
    s, t = _logits(3, 5, 10), _logits(3, 5, 11)
    T = 3.0

    def z(x):
        x = x.numpy()
        return (x - x.mean(1, keepdims=True)) / (x.std(1, ddof=1, keepdims=True) + 1e-7)

    def softmax(x):
        e = np.exp(x / T - (x / T).max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p_s, p_t = softmax(z(s)), softmax(z(t))
    expected = T * T * np.mean(np.sum(p_t * np.log(p_t / p_s), 1))
    assert abs(logit_std_loss(s, t, T).item() - expected) < 1e-9
    assert torch.allclose(standardize_logits(s).std(-1), torch.ones(3, dtype=torch.float64), atol=1e-6)


# ----------------------------------------------------------------------------- NKD
def test_nkd_hand_computed_value():
    s = torch.tensor([[2.0, 0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 3.0, 0.0]], dtype=torch.float64)
    y, T, gamma = 0, 2.0, 1.5
    S_t = math.exp(2.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(1.0))
    T_t = math.exp(1.0) / (math.exp(1.0) + math.exp(3.0) + math.exp(0.0))
    # non-target classes 1, 2: normalized softmax at T
    n_t = [math.exp(3.0 / T), math.exp(0.0 / T)]
    n_s = [math.exp(0.0 / T), math.exp(1.0 / T)]
    n_t = [v / sum(n_t) for v in n_t]
    n_s = [v / sum(n_s) for v in n_s]
    expected = -T_t * math.log(S_t) - gamma * T**2 * sum(a * math.log(b) for a, b in zip(n_t, n_s))
    assert abs(nkd_loss(s, t, torch.tensor([y]), T, gamma).item() - expected) < 1e-10


def test_nkd_identical_logits_give_the_derived_minimum():
    """At z_s == z_t: mean[-T_t log T_t + gamma T^2 H(N(T))]; the non-target part is at its minimum."""
    z = _logits(4, 6, 12)
    target = torch.tensor([0, 3, 5, 1])
    T, gamma = 3.0, 3.5
    expected = 0.0
    for i in range(4):
        p = torch.softmax(z[i], -1)
        t_t = p[target[i]].item()
        others = torch.cat([z[i, : target[i]], z[i, target[i] + 1 :]])
        n = torch.softmax(others / T, -1)
        expected += -t_t * math.log(t_t) + gamma * T**2 * -(n * n.log()).sum().item()
    assert abs(nkd_loss(z, z.clone(), target, T, gamma).item() - expected / 4) < 1e-10
    # the gradient of the non-target part (gamma term) vanishes at identical logits
    zs = z.clone().requires_grad_()
    g_full = torch.autograd.grad(nkd_loss(zs, z, target, T, gamma), zs)[0]
    g_target_only = torch.autograd.grad(nkd_loss(zs, z, target, T, 0.0), zs)[0]
    assert torch.allclose(g_full, g_target_only, atol=1e-12)
    # ... and moving the student's non-target logits away raises the loss
    bumped = z.clone()
    bumped[:, 2] += torch.where(target == 2, 0.0, 1.0)
    assert nkd_loss(bumped, z, target, T, gamma) > nkd_loss(z, z, target, T, gamma)


# ------------------------------------------------------------------- they train
@pytest.mark.parametrize(
    "name, params",
    [("dkd", {"warmup_epochs": 2}), ("dist", {"T": 4.0}), ("logit_std", {"weight": 9.0}), ("nkd", {"T": 3.0})],
)
def test_method_trains_the_student_only(name, params):
    torch.manual_seed(0)
    student = create_model("cnn1d", input_shape=(40,), channels=4, depth=2)
    teacher = create_model("cnn1d", input_shape=(40,), channels=8, depth=3)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = Batch(torch.randn(8, 40), torch.tensor([0, 1, -1, 3, -1, 5, 6, 7]), torch.arange(8))
    scheme = offline_task(student, Objective.from_config({"ce": {}, name: dict(params)}), teacher)
    scheme.setup(batch)
    module = scheme.module.train()
    loss, terms = module(batch, 3.0)
    assert set(terms) == {"ce", name} and torch.isfinite(loss) and terms[name].item() > 0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_before.items())


@pytest.mark.parametrize("name, old", [("dist", "tau"), ("nkd", "temp"), ("crd", "nce_t")])
def test_former_temperature_names_are_refused_with_the_new_one(name, old):
    with pytest.raises(ConfigError, match=rf"losses.{name}.{old}: renamed to 'T'"):
        create_loss(name, **{old: 2.0})
    assert create_loss(name, T=2.0).T == 2.0
