"""CRD, RKD, SP and CC: the math on hand-checkable tensors, invariances, memory-bank behaviour, training."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses import create_loss
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.cc import cc_loss, taylor_rbf_correlation
from darkknowledge.losses.crd import (
    contrast_scores,
    gather_across_ranks,
    momentum_update,
    nce_loss,
    sample_negatives,
)
from darkknowledge.losses.objective import Objective
from darkknowledge.losses.rkd import rkd_loss
from darkknowledge.losses.sp import similarity_matrix, sp_loss
from darkknowledge.models import create_model
from darkknowledge.schemes.offline import offline_task


def _rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# ------------------------------------------------------------------------------------ RKD
def test_rkd_identical_is_zero_and_invariant_to_similarity_transforms():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 5, generator=g, dtype=torch.float64)
    t = torch.randn(7, 9, generator=g, dtype=torch.float64)  # other width: distances live in each space
    assert rkd_loss(s, s.clone()).item() < 1e-12
    base = rkd_loss(s, t)
    assert base.item() > 0
    # Park et al. Sec. 3.2: the normalised distance and the angle ignore scale (either side) ...
    assert torch.allclose(rkd_loss(3.0 * s, t), base, atol=1e-9)
    assert torch.allclose(rkd_loss(s, 0.2 * t), base, atol=1e-9)
    # ... and rotation and translation
    moved = s @ _rotation(5, 1) + torch.randn(1, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(rkd_loss(moved, t), base, atol=1e-9)
    assert torch.allclose(rkd_loss(s, t @ _rotation(9, 2) - 4.0), base, atol=1e-9)


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _rkd_by_hand(s: list[tuple[float, float]], t: list[tuple[float, float]]) -> tuple[float, float]:
    """Distance and angle terms with plain loops (Park et al. Eq. 4-7)."""
    n = len(s)

    def dists(p):
        d = [[math.dist(p[i], p[j]) for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[d[i][j] / mu for j in range(n)] for i in range(n)]

    def cos(p, i, j, k):  # angle at vertex j between p_i and p_k
        a = (p[i][0] - p[j][0], p[i][1] - p[j][1])
        b = (p[k][0] - p[j][0], p[k][1] - p[j][1])
        na, nb = math.hypot(*a), math.hypot(*b)
        return 0.0 if na == 0 or nb == 0 else (a[0] * b[0] + a[1] * b[1]) / (na * nb)

    ds, dt = dists(s), dists(t)
    loss_d = sum(_huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    loss_a = sum(_huber(cos(s, i, j, k) - cos(t, i, j, k)) for i in range(n) for j in range(n) for k in range(n)) / n**3
    return loss_d, loss_a


def test_rkd_matches_a_hand_checked_three_point_example():
    t = [(0.0, 0.0), (3.0, 0.0), (0.0, 4.0)]  # a 3-4-5 triangle: distances / mean 4 = 0.75, 1, 1.25
    s = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)]  # isosceles right triangle
    loss_d, loss_a = _rkd_by_hand(s, t)
    st, tt = torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
    assert math.isclose(rkd_loss(st, tt, w_d=1.0, w_a=0.0).item(), loss_d, rel_tol=1e-9)
    assert math.isclose(rkd_loss(st, tt, w_d=0.0, w_a=1.0).item(), loss_a, rel_tol=1e-9)
    assert math.isclose(rkd_loss(st, tt).item(), 25 * loss_d + 50 * loss_a, rel_tol=1e-9)
    # e.g. the right angle at vertex 0 is shared (cos 0), the vertex-1 angles differ: cos 0.6 vs cos 45 deg
    assert loss_a > 0 and loss_d > 0


# ------------------------------------------------------------------------------------- SP
def test_sp_identical_is_zero_and_ignores_channel_order():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 4, 5, generator=g)
    t = torch.randn(6, 8, 3, generator=g)  # other channels and length: G is (b, b)
    assert sp_loss(s, s.clone()).item() < 1e-12
    base = sp_loss(s, t)
    assert torch.allclose(sp_loss(s, t[:, torch.randperm(8, generator=g)]), base, atol=1e-6)
    assert torch.allclose(sp_loss(s[:, torch.randperm(4, generator=g)], t), base, atol=1e-6)


def test_sp_matches_hand_computed_three_sample_example():
    qs = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    qt = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])

    def g(q):
        gram = q @ q.T
        return gram / np.sqrt((gram**2).sum(axis=1, keepdims=True))

    # e.g. G_S row 0: Q_0 . Q_j = (1, 1, 0) -> (1, 1, 0) / sqrt(2)
    assert np.allclose(g(qs)[0], [1 / math.sqrt(2), 1 / math.sqrt(2), 0.0])
    expected = ((g(qt) - g(qs)) ** 2).sum() / 9
    got = sp_loss(torch.tensor(qs), torch.tensor(qt))
    assert math.isclose(got.item(), expected, rel_tol=1e-9)
    assert torch.allclose(similarity_matrix(torch.tensor(qs)).norm(dim=1), torch.ones(3, dtype=torch.float64))


# ------------------------------------------------------------------------------------- CC
def test_cc_taylor_kernel_matches_its_series_and_tends_to_the_rbf():
    g = torch.Generator().manual_seed(0)
    e = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1)
    gamma = 0.4
    c = taylor_rbf_correlation(e, gamma, order=2)
    for i in range(5):
        for j in range(5):
            x = float(e[i] @ e[j])
            series = math.exp(-2 * gamma) * (1 + 2 * gamma * x + (2 * gamma * x) ** 2 / 2)  # P = 2
            assert math.isclose(c[i, j].item(), series, rel_tol=1e-12)
    # high orders converge to exp(-gamma ||x - y||^2) for unit vectors
    rbf = torch.exp(-gamma * torch.cdist(e, e) ** 2)
    assert torch.allclose(taylor_rbf_correlation(e, gamma, order=12), rbf, atol=1e-9)
    # the rows are normalised inside: scaling a sample does not change C
    assert torch.allclose(taylor_rbf_correlation(e * torch.arange(1.0, 6.0, dtype=torch.float64)[:, None], gamma), c)


def test_cc_loss_value_and_identity():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 7, generator=g)
    assert cc_loss(s, s.clone()).item() < 1e-12
    expected = ((taylor_rbf_correlation(s) - taylor_rbf_correlation(t)) ** 2).sum() / 16
    assert torch.allclose(cc_loss(s, t), expected)


# ------------------------------------------------------------------------------------ CRD
def test_negatives_exclude_the_positive_and_are_distinct():
    torch.manual_seed(0)
    pos = torch.tensor([0, 5, 9, 3, 9])
    neg = sample_negatives(pos, num_samples=10, k=6)
    assert neg.shape == (5, 6) and neg.min() >= 0 and neg.max() < 10
    assert not (neg == pos[:, None]).any()
    assert all(len(set(row.tolist())) == 6 for row in neg)
    full = sample_negatives(pos, num_samples=10, k=9)  # k = N - 1: every other index exactly once
    for p, row in zip(pos.tolist(), full):
        assert sorted(row.tolist()) == [i for i in range(10) if i != p]
    # uniform over the other indices
    many = sample_negatives(torch.zeros(4000, dtype=torch.long), num_samples=5, k=1).flatten()
    counts = torch.bincount(many, minlength=5)
    assert counts[0] == 0 and (counts[1:] - 1000).abs().max() < 150


def test_nce_loss_and_scores_match_repdistiller_form():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 5, generator=g, dtype=torch.float64) * 2  # (B, K+1) scores, positive first
    n = 50
    kpn = 4 / n
    by_hand = 0.0
    for row in x.tolist():
        by_hand -= math.log(row[0] / (row[0] + kpn + 1e-7))
        by_hand -= sum(math.log(kpn / (v + kpn + 1e-7)) for v in row[1:])
    assert math.isclose(nce_loss(x, n).item(), by_hand / 3, rel_tol=1e-9)
    anchor = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    memory = torch.randn(8, 4, generator=g)
    index = torch.randint(0, 8, (3, 5), generator=g)
    rows = memory.index_select(0, index.view(-1)).view(3, 5, 4)  # RepDistiller's bmm path
    expected = torch.exp(torch.bmm(rows, anchor.view(3, 4, 1)).squeeze(-1) / 0.07)
    assert torch.allclose(contrast_scores(anchor, memory, index, 0.07), expected, rtol=1e-5)


def test_momentum_update_rule():
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(6, 3, generator=g)
    emb = F.normalize(torch.randn(2, 3, generator=g), dim=1)
    new = momentum_update(memory, torch.tensor([4, 1]), emb, 0.5)
    expected = F.normalize(0.5 * memory[[4, 1]] + 0.5 * emb, dim=1)
    assert torch.allclose(new[[4, 1]], expected)
    keep = [0, 2, 3, 5]
    assert torch.equal(new[keep], memory[keep])
    assert gather_across_ranks(torch.arange(3))[0].tolist() == [0, 1, 2]  # single process: identity


def _crd(num_samples=20, **params):
    torch.manual_seed(0)
    loss = create_loss("crd", **params)
    loss.pairs = [("fs", "ft")]
    fs, ft = torch.randn(4, 6), torch.randn(4, 10)
    loss.setup(Outputs(None, {"fs": fs}), Outputs(None, {"ft": ft}), SetupInfo(num_samples=num_samples))
    return loss


def _crd_step(loss, idx, seed):
    g = torch.Generator().manual_seed(seed)
    fs, ft = torch.randn(len(idx), 6, generator=g), torch.randn(len(idx), 10, generator=g)
    batch = Batch(torch.zeros(len(idx), 1), torch.zeros(len(idx), dtype=torch.long), torch.tensor(idx))
    return loss(Outputs(None, {"fs": fs}), Outputs(None, {"ft": ft}), batch), fs, ft


def test_crd_memory_banks_embeddings_and_z():
    loss = _crd(feat_dim=8)
    assert loss.memory_s.shape == (20, 8) and loss.k == 19  # nce_k 16384 capped at N - 1
    assert torch.equal(loss.z, torch.tensor([-1.0, -1.0]))
    before_s, before_t = loss.memory_s.clone(), loss.memory_t.clone()
    value, fs, ft = _crd_step(loss, [3, 7, 11], seed=1)
    assert math.isfinite(value.item())
    z = loss.z.clone()
    assert (z > 0).all()  # set from the first batch: N * mean(exp(<v, m> / T))
    v_s, v_t = loss.embed_s(fs), loss.embed_t(ft)
    assert torch.allclose(v_s.norm(dim=1), torch.ones(3)) and torch.allclose(v_t.norm(dim=1), torch.ones(3))
    # the batch's update is applied after the next step's scores: same batch again -> same loss
    again, _, _ = _crd_step(loss, [3, 7, 11], seed=1)
    assert torch.allclose(again, value)
    assert torch.equal(loss.z, z)  # Z fixed after the first call
    # ...and now rows 3, 7, 11 moved by the momentum rule, with the first call's embeddings
    rows = [3, 7, 11]
    assert torch.allclose(loss.memory_s[rows], F.normalize(0.5 * before_s[rows] + 0.5 * v_s.detach(), dim=1), atol=1e-6)
    assert torch.allclose(loss.memory_t[rows], F.normalize(0.5 * before_t[rows] + 0.5 * v_t.detach(), dim=1), atol=1e-6)
    other = [i for i in range(20) if i not in rows]
    assert torch.equal(loss.memory_s[other], before_s[other]) and torch.equal(loss.memory_t[other], before_t[other])
    value.backward()  # the graph survived the (out-of-place) memory update
    assert loss.embed_s.linear.weight.grad is not None and loss.embed_t.linear.weight.grad is not None


def test_crd_checkpoint_resumes_memory_z_and_pending_update():
    loss = _crd(feat_dim=8, nce_k=5)
    _crd_step(loss, [0, 1, 2], seed=1)
    _crd_step(loss, [5, 6], seed=2)
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in loss.state_dict().items()}
    assert {"memory_s", "memory_t", "z"} <= set(state)
    fresh = _crd(feat_dim=8, nce_k=5)
    fresh.load_state_dict(state)
    torch.manual_seed(3)
    a, _, _ = _crd_step(loss, [8, 9], seed=4)
    torch.manual_seed(3)
    b, _, _ = _crd_step(fresh, [8, 9], seed=4)
    assert torch.allclose(a, b)
    assert torch.equal(loss.memory_s, fresh.memory_s)  # the pending update of [5, 6] was restored and applied


# ------------------------------------------------------------------------------- training
PARAMS = {"crd": {"nce_k": 16, "feat_dim": 8}, "rkd": {}, "sp": {}, "cc": {"feat_dim": 8, "embed": True}}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_method_trains_between_cnns_of_different_width_and_length(name):
    torch.manual_seed(0)
    teacher = create_model("cnn1d", input_shape=(40,), channels=32, depth=3)  # last stage (32, 10), fc:input 320
    student = create_model("cnn1d", input_shape=(40,), channels=8, depth=2)  # last stage (8, 20), fc:input 160
    batch = Batch(torch.randn(8, 40), torch.tensor([0, 1, 2, 3, -1, -1, 4, 5]), torch.arange(10, 18))
    scheme = offline_task(student, Objective.from_config({"ce": {}, name: PARAMS[name]}), teacher)
    scheme.setup(batch, SetupInfo(num_samples=40, batch_size=8))
    module = scheme.module.train()
    loss, terms = module(batch)
    assert math.isfinite(terms[name].item()) and terms[name].item() > 0
    loss.backward()
    term = module.objective.terms[name]
    own = list(term.parameters())
    assert (len(own) > 0) == (name in ("crd", "cc"))  # CRD/CC embed both sides; RKD/SP need no adapter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_options():
    # CC without embeddings (the default) has no parameters and works on raw widths
    cc = create_loss("cc")
    cc.pairs = [("s", "t")]
    s, t = torch.randn(5, 3, requires_grad=True), torch.randn(5, 11)
    cc.setup(Outputs(None, {"s": s}), Outputs(None, {"t": t}), SetupInfo())
    out = cc(Outputs(None, {"s": s}), Outputs(None, {"t": t}), None)
    assert not list(cc.parameters()) and torch.allclose(out, cc_loss(s, t))
    # RKD term weights select the terms
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    only_d, only_a = rkd_loss(x, y, 1.0, 0.0), rkd_loss(x, y, 0.0, 1.0)
    assert torch.allclose(rkd_loss(x, y, 25.0, 50.0), 25 * only_d + 50 * only_a)
    # CRD uses every other sample when nce_k >= N - 1, and needs one feature pair
    assert _crd(num_samples=7, nce_k=100).k == 6 and _crd(num_samples=100, nce_k=10).k == 10
    with pytest.raises(ConfigError, match="one feature pair"):
        loss = create_loss("crd")
        loss.pairs = [("a", "b"), ("c", "d")]
        loss.setup(Outputs(None), Outputs(None), SetupInfo(num_samples=10))
