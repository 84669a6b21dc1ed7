"""Token-level divergences (fkl, rkl, jsd, skew_fkl, skew_rkl, tv): math, limits, chunking, masking, sparse targets."""

import math

import numpy as np
import pytest
import torch

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.lm.targets import LazyLogits, sampled_targets, topk_targets
from darkknowledge.losses import create_loss
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.fkl import forward_kl
from darkknowledge.losses.jsd import generalized_jsd
from darkknowledge.losses.rkl import reverse_kl
from darkknowledge.losses.skew_kl import skew_forward_kl, skew_reverse_kl
from darkknowledge.losses.tv import total_variation

NAMES = ["fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tv"]
F64 = torch.float64


def _batch(y):
    return Batch(torch.zeros(y.shape[0], 1), y, torch.arange(y.shape[0]))


def _loss(name, student, teacher, y, **params):
    """The registered loss on student/teacher given as tensors, LazyLogits or sparse targets."""

    def wrap(d):
        return Outputs(d, tokens=None) if isinstance(d, torch.Tensor) else Outputs(None, tokens=d)

    return create_loss(name, **params)(wrap(student), wrap(teacher), _batch(y))


def _lazy(hidden, weight):
    return LazyLogits(hidden, lambda h: h @ weight.T, int(weight.shape[0]))


def _y(B, L, ignored=((0, 0), (1, 2))):
    y = torch.arange(B * L).reshape(B, L) % 3
    for b, t in ignored:
        y[b, t] = -1
    return y


# ------------------------------------------------------------------ golden values, by explicit loops
def _np_softmax(z, T):
    e = [math.exp(v / T - max(z) / T) for v in z]
    return [x / sum(e) for x in e]


def _np_div(name, ps, pt, beta=0.5, lam=0.1):
    V = len(ps)
    if name == "fkl":
        return sum(pt[v] * math.log(pt[v] / ps[v]) for v in range(V))
    if name == "rkl":
        return sum(ps[v] * math.log(ps[v] / pt[v]) for v in range(V))
    if name == "jsd":
        m = [beta * pt[v] + (1 - beta) * ps[v] for v in range(V)]
        return beta * sum(pt[v] * math.log(pt[v] / m[v]) for v in range(V)) + (1 - beta) * sum(
            ps[v] * math.log(ps[v] / m[v]) for v in range(V)
        )
    if name == "skew_fkl":
        return sum(pt[v] * math.log(pt[v] / (lam * pt[v] + (1 - lam) * ps[v])) for v in range(V))
    if name == "skew_rkl":
        return sum(ps[v] * math.log(ps[v] / (lam * ps[v] + (1 - lam) * pt[v])) for v in range(V))
    return 0.5 * sum(abs(pt[v] - ps[v]) for v in range(V))


S_FIXED = [
    [[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0], [2.0, -2.0, 0.0, 0.5]],
    [[-1.0, 0.5, 0.5, 2.0], [1.5, 1.0, -0.5, 0.0], [0.0, 4.0, 1.0, 1.0]],
]
T_FIXED = [
    [[0.0, 3.0, 1.0, 0.0], [1.0, -1.0, 2.0, 2.0], [2.5, -1.0, 0.5, 0.0]],
    [[0.5, 0.5, 0.0, 1.0], [3.0, 0.0, 0.0, -1.0], [1.0, 2.0, 2.0, -2.0]],
]


@pytest.mark.parametrize(
    "name,params",
    [
        ("fkl", {}),
        ("rkl", {}),
        ("jsd", {"beta": 0.3}),
        ("jsd", {"beta": 0.5}),
        ("skew_fkl", {"lam": 0.1}),
        ("skew_rkl", {"lam": 0.25}),
        ("tv", {}),
    ],
)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_golden_values_on_fixed_logits(name, params, chunk_size):
    """Loss = mean over kept positions of the textbook divergence at T = 2, computed by loops."""
    s, t, T = torch.tensor(S_FIXED, dtype=F64), torch.tensor(T_FIXED, dtype=F64), 2.0
    y = torch.tensor([[1, -1, 2], [0, 3, -1]])
    want = np.mean(
        [
            _np_div(name, _np_softmax(S_FIXED[b][i], T), _np_softmax(T_FIXED[b][i], T), **params)
            for b in range(2)
            for i in range(3)
            if y[b, i] != -1
        ]
    )
    got = _loss(name, s, t, y, T=T, chunk_size=chunk_size, **params)
    assert got.dtype == F64
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_golden_topk_buckets_by_loops():
    """Top-k targets: the divergence between the (k + 1)-bucket distributions, computed by hand; the
    gradient is that of the bucketed divergence written out with softmax and 1 - sum."""
    s, t = torch.tensor(S_FIXED[0], dtype=torch.float32), torch.tensor(T_FIXED[0], dtype=torch.float32)
    targets = topk_targets(t, k=2)
    y = torch.tensor([0, 1, 2])
    for name in NAMES:
        rows = []
        for i in range(3):
            ps, pt = _np_softmax(S_FIXED[0][i], 1.0), _np_softmax(T_FIXED[0][i], 1.0)
            ids = targets.ids[i].tolist()
            bs = [ps[v] for v in ids] + [1 - sum(ps[v] for v in ids)]
            bt = [pt[v] for v in ids] + [1 - sum(pt[v] for v in ids)]
            rows.append(_np_div(name, bs, bt))
        got, (grad,) = _value_and_grads(lambda z, name=name: _loss(name, z, targets, y, chunk_size=2), s)
        assert got.item() == pytest.approx(np.mean(rows), rel=1e-5, abs=1e-6), name

        def by_hand(z, name=name):
            p = torch.softmax(z.double(), -1)  # (3, 4)
            listed = p.gather(1, targets.ids)  # (3, 2)
            bs = torch.cat([listed, 1 - listed.sum(-1, keepdim=True)], -1).log()
            pt = torch.softmax(t.double(), -1).gather(1, targets.ids)
            bt = torch.cat([pt, 1 - pt.sum(-1, keepdim=True)], -1).log()
            fn = {
                "fkl": forward_kl,
                "rkl": reverse_kl,
                "jsd": lambda a, b: generalized_jsd(a, b, 0.5),
                "skew_fkl": lambda a, b: skew_forward_kl(a, b, 0.1),
                "skew_rkl": lambda a, b: skew_reverse_kl(a, b, 0.1),
                "tv": total_variation,
            }[name]
            return fn(bs, bt).mean()

        _, (want,) = _value_and_grads(by_hand, s)
        torch.testing.assert_close(grad, want.float(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ zero at identity, limits, bounds
@pytest.mark.parametrize("name", NAMES)
def test_zero_for_identical_distributions_dense_lazy_and_sparse(name):
    torch.manual_seed(0)
    hidden, w = torch.randn(2, 5, 4), torch.randn(9, 4)
    lazy = _lazy(hidden, w)
    z = lazy.logits().detach()
    y = _y(2, 5)
    assert _loss(name, z, z.clone(), y).abs().item() < 1e-6
    assert _loss(name, lazy, _lazy(hidden, w), y, chunk_size=3).abs().item() < 1e-6
    assert _loss(name, lazy, z.flip(-1), y).item() > 1e-3  # a different teacher is not at zero
    assert _loss(name, z, topk_targets(z, k=3), y).abs().item() < 1e-6
    assert _loss(name, z, sampled_targets(z, 4, generator=torch.Generator().manual_seed(0)), y).abs().item() < 1e-6


def test_jsd_endpoints_are_the_kls_and_scaled_limits_tend_to_them():
    """TRL's endpoints: beta=0 -> KL(p_t||p_s), beta=1 -> KL(p_s||p_t); JSD(b)/b -> KL(p_t||p_s) as b -> 0,
    JSD(b)/(1-b) -> KL(p_s||p_t) as b -> 1, while JSD(b) itself tends to 0 (GKD Eq. 1)."""
    g = torch.Generator().manual_seed(1)
    s = torch.log_softmax(torch.randn(6, 8, generator=g, dtype=F64) * 2, -1)
    t = torch.log_softmax(torch.randn(6, 8, generator=g, dtype=F64) * 2, -1)
    fkl, rkl = forward_kl(s, t), reverse_kl(s, t)
    assert torch.equal(generalized_jsd(s, t, 0.0), fkl) and torch.equal(generalized_jsd(s, t, 1.0), rkl)
    assert not torch.allclose(fkl, rkl, rtol=0.05)
    errors = []
    for eps in (1e-4, 1e-7):
        err_f = ((generalized_jsd(s, t, eps) / eps - fkl) / fkl).abs().max()
        err_r = ((generalized_jsd(s, t, 1 - eps) / eps - rkl) / rkl).abs().max()
        errors.append(max(err_f, err_r).item())
    assert errors[1] < 1e-4 and errors[1] < errors[0] / 100  # relative error shrinks about like beta
    assert (generalized_jsd(s, t, 1e-4) < 1e-3 * fkl).all()  # the literal definition vanishes at the ends


def test_jsd_half_is_symmetric_and_bounded_by_log2():
    g = torch.Generator().manual_seed(2)
    s = torch.log_softmax(torch.randn(5, 7, generator=g, dtype=F64) * 3, -1)
    t = torch.log_softmax(torch.randn(5, 7, generator=g, dtype=F64) * 3, -1)
    torch.testing.assert_close(generalized_jsd(s, t, 0.5), generalized_jsd(t, s, 0.5), rtol=1e-12, atol=1e-15)
    assert not torch.allclose(generalized_jsd(s, t, 0.2), generalized_jsd(t, s, 0.2))  # only 0.5 is symmetric
    disjoint_s = torch.log_softmax(torch.tensor([[60.0, 0.0, 0.0]], dtype=F64), -1)
    disjoint_t = torch.log_softmax(torch.tensor([[0.0, 60.0, 0.0]], dtype=F64), -1)
    assert generalized_jsd(disjoint_s, disjoint_t, 0.5).item() == pytest.approx(math.log(2), rel=1e-9)
    assert (generalized_jsd(s, t, 0.5) <= math.log(2)).all()


def test_skew_kls_at_lam_zero_are_the_plain_kls_and_are_bounded_by_log_inverse_lam():
    g = torch.Generator().manual_seed(3)
    s = torch.log_softmax(torch.randn(6, 9, generator=g, dtype=F64) * 3, -1)
    t = torch.log_softmax(torch.randn(6, 9, generator=g, dtype=F64) * 3, -1)
    assert torch.equal(skew_forward_kl(s, t, 0.0), forward_kl(s, t))
    assert torch.equal(skew_reverse_kl(s, t, 0.0), reverse_kl(s, t))
    # the mixture keeps lam of the first argument: log(1/lam) bounds it, approached by disjoint distributions
    one_hot_t = torch.log_softmax(torch.tensor([[80.0, 0.0, 0.0, 0.0]], dtype=F64), -1)
    one_hot_s = torch.log_softmax(torch.tensor([[0.0, 80.0, 0.0, 0.0]], dtype=F64), -1)
    for lam in (0.1, 0.3):
        for fn in (skew_forward_kl, skew_reverse_kl):
            assert (fn(s, t, lam) <= math.log(1 / lam)).all()
            assert fn(one_hot_s, one_hot_t, lam).item() == pytest.approx(math.log(1 / lam), rel=1e-9)
        assert (skew_forward_kl(s, t, lam) < forward_kl(s, t)).all()  # skewing shrinks it
    # the skews are not each other's mirror: SRKL(p, q) = SKL with the roles of teacher and student swapped
    torch.testing.assert_close(skew_reverse_kl(s, t, 0.1), skew_forward_kl(t, s, 0.1))


def test_tv_is_symmetric_and_in_unit_interval():
    g = torch.Generator().manual_seed(4)
    s = torch.log_softmax(torch.randn(5, 6, generator=g, dtype=F64) * 4, -1)
    t = torch.log_softmax(torch.randn(5, 6, generator=g, dtype=F64) * 4, -1)
    torch.testing.assert_close(total_variation(s, t), total_variation(t, s))
    assert ((total_variation(s, t) > 0) & (total_variation(s, t) <= 1)).all()


def test_class_endpoints_match_through_the_registry():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 4, 6, generator=g, dtype=F64), torch.randn(3, 4, 6, generator=g, dtype=F64)
    y = _y(3, 4)
    fkl, rkl = _loss("fkl", s, t, y), _loss("rkl", s, t, y)
    assert torch.equal(_loss("jsd", s, t, y, beta=0.0), fkl) and torch.equal(_loss("jsd", s, t, y, beta=1.0), rkl)
    assert torch.equal(_loss("skew_fkl", s, t, y, lam=0.0), fkl)
    assert torch.equal(_loss("skew_rkl", s, t, y, lam=0.0), rkl)


# ------------------------------------------------------------------ chunking and LazyLogits
def _value_and_grads(fn, *leaves):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_unchunked_for_tensors_lazy_logits_and_sparse(name):
    torch.manual_seed(6)
    B, L, d, V = 3, 5, 4, 7
    hs, ws, ht, wt = (
        torch.randn(B, L, d, dtype=F64),
        torch.randn(V, d, dtype=F64),
        torch.randn(B, L, d, dtype=F64),
        torch.randn(V, d, dtype=F64),
    )
    y = _y(B, L)
    teacher_z = (ht @ wt.T).detach()
    ref, ref_grads = _value_and_grads(lambda h, w: _loss(name, (h @ w.T), teacher_z, y, chunk_size=None), hs, ws)
    for chunk in (1, 2, 4, 100):
        for teacher in (teacher_z, _lazy(ht, wt)):
            out, grads = _value_and_grads(
                lambda h, w, tc=teacher, c=chunk: _loss(name, _lazy(h, w), tc, y, chunk_size=c), hs, ws
            )
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
            for g, r in zip(grads, ref_grads):
                torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)
        out, grads = _value_and_grads(lambda h, w, c=chunk: _loss(name, h @ w.T, teacher_z, y, chunk_size=c), hs, ws)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-10, atol=1e-13)
    for targets in (
        topk_targets(teacher_z, 3),
        sampled_targets(teacher_z, 3, generator=torch.Generator().manual_seed(0)),
    ):
        whole, whole_g = _value_and_grads(lambda h, tg=targets: _loss(name, _lazy(h, ws), tg, y, chunk_size=0), hs)
        part, part_g = _value_and_grads(lambda h, tg=targets: _loss(name, _lazy(h, ws), tg, y, chunk_size=2), hs)
        torch.testing.assert_close(part, whole, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(part_g[0], whole_g[0], rtol=1e-10, atol=1e-13)


def test_chunks_are_checkpointed_and_the_teacher_gets_no_gradient():
    """The student head runs once per chunk in the forward and again in the backward (recomputed, not
    stored); no (n, V) tensor is saved for backward outside the chunks; the teacher's head gets no grad."""
    torch.manual_seed(7)
    hs, ws = torch.randn(2, 6, 4, requires_grad=True), torch.randn(11, 4, requires_grad=True)
    ht, wt = torch.randn(2, 6, 4), torch.randn(11, 4, requires_grad=True)
    calls = []

    def head(h):
        calls.append(h.shape[0])
        return h @ ws.T

    student = LazyLogits(hs, head, 11)
    y = _y(2, 6)  # 10 kept positions
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        loss = _loss("jsd", student, _lazy(ht, wt), y, chunk_size=4)
    assert calls == [4, 4, 2]
    assert max(saved, default=0) < 4 * 11  # not even one chunk's logits are kept
    loss.backward()
    assert sorted(calls) == sorted([4, 4, 2] * 2)  # each chunk recomputed once in the backward
    assert wt.grad is None and ws.grad is not None and torch.isfinite(hs.grad).all()


# ------------------------------------------------------------------ masking
@pytest.mark.parametrize("name", NAMES)
def test_ignored_positions_change_nothing_and_get_no_gradient(name):
    torch.manual_seed(8)
    s, t = torch.randn(2, 4, 6, dtype=F64), torch.randn(2, 4, 6, dtype=F64)
    y = _y(2, 4, ignored=((0, 1), (1, 3)))
    out, (gs,) = _value_and_grads(lambda z: _loss(name, z, t, y, chunk_size=3), s)
    s2, t2 = s.clone(), t.clone()
    s2[0, 1], t2[1, 3] = 100.0 * torch.randn(6, dtype=F64), -50.0
    out2 = _loss(name, s2, t2, y, chunk_size=3)
    torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-14)
    assert gs[0, 1].abs().sum() == 0 and gs[1, 3].abs().sum() == 0 and gs[0, 0].abs().sum() > 0
    hs, ws = torch.randn(2, 4, 3, dtype=F64), torch.randn(6, 3, dtype=F64)
    _, (gh,) = _value_and_grads(lambda h: _loss(name, _lazy(h, ws), t, y, chunk_size=3), hs)
    assert gh[0, 1].abs().sum() == 0 and gh[1, 3].abs().sum() == 0 and gh[0, 0].abs().sum() > 0


def test_no_kept_position_gives_a_zero_attached_to_the_graph():
    s = torch.randn(2, 3, 5, requires_grad=True)
    for name in NAMES:
        out = _loss(name, s, torch.randn(2, 3, 5), torch.full((2, 3), -1))
        out.backward()
        assert out.item() == 0.0 and s.grad is not None and (s.grad == 0).all()


# ------------------------------------------------------------------ sparse targets
@pytest.mark.parametrize("name", NAMES)
def test_topk_with_k_equal_to_the_vocabulary_is_the_dense_loss(name):
    torch.manual_seed(9)
    s, t = torch.randn(3, 4, 8), torch.randn(3, 4, 8) * 2
    y = _y(3, 4)
    dense, (gd,) = _value_and_grads(lambda z: _loss(name, z, t, y, T=2.0), s)
    sparse, (gs,) = _value_and_grads(lambda z: _loss(name, z, topk_targets(t, k=8, T=2.0), y, T=2.0), s)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-6)


def test_topk_buckets_bound_the_full_divergence_from_below():
    """Grouping ids into buckets can only shrink an f-divergence (data processing)."""
    torch.manual_seed(10)
    s, t = torch.randn(6, 12), torch.randn(6, 12) * 3
    y = torch.arange(6)
    for name in NAMES:
        for k in (1, 3, 6):
            assert _loss(name, s, topk_targets(t, k), y).item() <= _loss(name, s, t, y).item() + 1e-6


def test_sampled_forward_kl_is_unbiased_in_value_and_gradient():
    """Anshumann et al. 2025: E[sum_i w_i (log p_t - log p_s)] = KL(p_t || p_s), gradient included."""
    torch.manual_seed(11)
    N, V, R = 3, 6, 4000
    s, t = torch.randn(N, V), torch.randn(N, V) * 1.5
    dense, (g_dense,) = _value_and_grads(lambda z: _loss("fkl", z, t, torch.arange(N)), s)
    targets = sampled_targets(t.repeat(R, 1), draws=4, generator=torch.Generator().manual_seed(0))  # R*N rows
    est, (g_est,) = _value_and_grads(lambda z: _loss("fkl", z.repeat(R, 1), targets, torch.arange(R * N)), s)
    assert est.item() == pytest.approx(dense.item(), abs=0.02)  # ~4 standard errors of the mean
    torch.testing.assert_close(g_est, g_dense, rtol=0, atol=0.01)
    assert targets.weights.sum(-1).allclose(torch.ones(R * N))
    topk = _loss("fkl", s, topk_targets(t, 4), torch.arange(N))  # the biased alternative at the same width
    assert abs(topk.item() - dense.item()) > 3 * abs(est.item() - dense.item())


def test_other_divergences_on_sampled_targets_use_the_buckets_of_the_drawn_ids():
    s, t = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]]), torch.tensor([[1.0, 0.0, 3.0, 0.0, -2.0]])
    targets = sampled_targets(t, draws=3, generator=torch.Generator().manual_seed(3))
    used = targets.logp[0] > -math.inf
    ids = targets.ids[0][used].tolist()
    ps, pt = _np_softmax(s[0].tolist(), 1.0), _np_softmax(t[0].tolist(), 1.0)
    bs = [ps[v] for v in ids] + [1 - sum(ps[v] for v in ids)]
    bt = [pt[v] for v in ids] + [1 - sum(pt[v] for v in ids)]
    for name in ("rkl", "tv", "jsd"):
        assert _loss(name, s, targets, torch.zeros(1)).item() == pytest.approx(_np_div(name, bs, bt), rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_empty_slots_and_empty_tails_give_finite_values_and_gradients(name):
    """Unused sampled slots (logp=-inf, weight 0), top-k over the whole vocabulary (tail=-inf), a dense
    fp16 teacher with -inf log-probs and a peaked student: finite forward and backward."""
    torch.manual_seed(12)
    s = torch.randn(4, 30) * 3
    s[0, 0] = 40.0  # a student that is (numerically) certain at one position
    t = torch.randn(4, 30) * 5
    y = torch.arange(4)
    fp16 = torch.log_softmax(t, -1).half()
    fp16[:, :3] = -math.inf  # tokens the cached teacher rules out
    for teacher in (
        sampled_targets(t, 8, generator=torch.Generator().manual_seed(1)),
        topk_targets(t, 30),
        topk_targets(t, 2),
        fp16,
    ):
        out, (g,) = _value_and_grads(lambda z, tc=teacher: _loss(name, z, tc, y, chunk_size=3), s)
        assert math.isfinite(out.item()) and torch.isfinite(g).all(), type(teacher).__name__
    assert (sampled_targets(t, 8, generator=torch.Generator().manual_seed(1)).logp == -math.inf).any()


def test_half_precision_inputs_give_a_float32_loss():
    s, t = torch.randn(2, 3, 5).bfloat16(), torch.randn(2, 3, 5).half()
    out = _loss("jsd", s, t, _y(2, 3))
    assert out.dtype == torch.float32 and math.isfinite(out.item())


# ------------------------------------------------------------------ errors
def test_vocabulary_mismatch_names_both_sizes():
    y = _y(2, 3)
    with pytest.raises(ShapeError, match=r"student predicts 5 tokens but the teacher predicts 6"):
        _loss("fkl", torch.randn(2, 3, 5), torch.randn(2, 3, 6), y)
    lazy = _lazy(torch.randn(2, 3, 4), torch.randn(5, 4))
    with pytest.raises(ShapeError, match=r"5 tokens .* 7 .*vocabulary mismatch"):
        _loss("rkl", lazy, topk_targets(torch.randn(2, 3, 7), 2), y)
    loss = create_loss("tv")
    with pytest.raises(ShapeError, match="vocabulary mismatch"):
        loss.setup(Outputs(torch.randn(2, 5)), Outputs(torch.randn(2, 9)), SetupInfo())


def test_position_mismatch_and_missing_distributions_are_errors():
    with pytest.raises(ShapeError, match="6 positions but the teacher's covers 4"):
        _loss("fkl", torch.randn(2, 3, 5), torch.randn(2, 2, 5), _y(2, 3))
    with pytest.raises(ShapeError, match="holds 4 targets but the student's distribution covers 6"):
        _loss("fkl", torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ShapeError, match="needs the teacher's logits"):
        create_loss("fkl")(Outputs(torch.randn(2, 5)), Outputs(None), _batch(torch.zeros(2, dtype=torch.long)))


def test_temperature_must_match_sparse_targets():
    t = torch.randn(2, 3, 5)
    with pytest.raises(ConfigError, match=r"T=1.0 but the teacher's sparse targets .* T=2.0"):
        _loss("skew_fkl", torch.randn(2, 3, 5), topk_targets(t, 2, T=2.0), _y(2, 3))
    assert math.isfinite(_loss("skew_fkl", torch.randn(2, 3, 5), topk_targets(t, 2, T=2.0), _y(2, 3), T=2.0).item())


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("fkl", {"T": 0}, r"losses.fkl.T: .*greater than 0"),
        ("tv", {"chunk_size": -1}, r"losses.tv.chunk_size"),
        ("jsd", {"beta": 1.5}, r"losses.jsd.beta: .*less than or equal to 1"),
        ("skew_fkl", {"lam": 1.0}, r"losses.skew_fkl.lam: .*less than 1"),
        ("skew_rkl", {"lam": -0.1}, r"losses.skew_rkl.lam: .*greater than or equal to 0"),
    ],
)
def test_parameter_errors(name, params, match):
    with pytest.raises(ConfigError, match=match):
        create_loss(name, **params)
