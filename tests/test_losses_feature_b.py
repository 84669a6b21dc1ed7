"""FT, VID, OFD and ReviewKD: math on small tensors, training on mismatched models (1-D and 2-D), options."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from darkknowledge.config import OptimizerConfig
from darkknowledge.data.batch import Batch
from darkknowledge.engine.optim import build_optimizer
from darkknowledge.losses.feature import pre_activation_tap
from darkknowledge.losses.ft import ft_loss
from darkknowledge.losses.objective import Objective
from darkknowledge.losses.ofd import (
    gaussian_margin,
    margin_from_stats,
    negative_stats,
    ofd_partial_l2,
)
from darkknowledge.losses.reviewkd import hcl
from darkknowledge.losses.vid import vid_nll
from darkknowledge.models import create_model
from darkknowledge.schemes.offline import offline_task

# ------------------------------------------------------------------ mismatched model pairs
# 2-D: cnn2d (4, 8) stages (4,4,4), (8,2,2) vs resnet8 stages (16,8,8), (32,4,4), (64,2,2).
# 1-D: cnn1d 8 ch depth 2 stages (8,40), (8,20) vs cnn1d 16 ch depth 3 stages (16,40), (16,20), (16,10).
TAPS = {
    "2d": (["blocks.0", "blocks.1"], ["layer1", "layer3"]),  # (4,4,4)->(16,8,8), (8,2,2)->(64,2,2)
    "1d": (["blocks.0", "blocks.1"], ["blocks.1", "blocks.2"]),  # (8,40)->(16,20), (8,20)->(16,10)
}
PREACT_TAPS = {
    "2d": (["blocks.0", "blocks.1"], ["layer1.0.relu_out:input", "layer3.0.relu_out:input"]),
    "1d": (["blocks.0.1:input", "blocks.1.1:input"], ["blocks.1.1:input", "blocks.2.1:input"]),
}


def models(dims):
    torch.manual_seed(0)
    if dims == "2d":
        student = create_model("cnn2d", num_classes=5, input_shape=(1, 8, 8), channels=(4, 8), hidden=16)
        teacher = create_model("resnet8", num_classes=5, input_shape=(1, 8, 8))
        x = torch.randn(6, 1, 8, 8)
    else:
        student = create_model("cnn1d", num_classes=5, input_shape=(40,), channels=8, depth=2)
        teacher = create_model("cnn1d", num_classes=5, input_shape=(40,), channels=16, depth=3)
        x = torch.randn(6, 40)
    return student, teacher, Batch(x, torch.tensor([0, 1, 2, 3, 4, -1]), torch.arange(6))


def build(name, dims, **params):
    student, teacher, batch = models(dims)
    scheme = offline_task(student, Objective.from_config({name: params}), teacher)
    scheme.setup(batch)
    return scheme, scheme.module.objective.terms[name], teacher, batch


def step(scheme, teacher, batch):
    """One training forward/backward; the teacher must get no gradient."""
    module = scheme.module.train()
    loss, _ = module(batch)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    return loss


def assert_trains(term):
    """Every trainable parameter of the loss's own modules got a gradient, some non-zero."""
    params = [p for p in term.parameters() if p.requires_grad]
    assert params and all(p.grad is not None for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)


# ------------------------------------------------------------------------------------ FT
def test_ft_identical_factors_give_zero_and_hand_value():
    f = torch.randn(3, 4, 5)
    assert ft_loss(f, f.clone()).item() < 1e-7
    assert ft_loss(2.0 * f, f).item() < 1e-7  # each factor is L2-normalised per sample
    s, t = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])  # unit: (0.6, 0.8) vs (1, 0)
    assert abs(ft_loss(s, t, p=1).item() - (0.4 + 0.8) / 2) < 1e-6
    assert abs(ft_loss(s, t, p=2).item() - (0.16 + 0.64) / 2) < 1e-6


@pytest.mark.parametrize("dims", ["1d", "2d"])
def test_ft_pretrain_lowers_reconstruction_then_freezes(dims):
    s_taps, t_taps = TAPS[dims]
    scheme, ft, teacher, batch = build(
        "ft", dims, student_taps=s_taps[:1], teacher_taps=t_taps[-1:], paraphraser_epochs=40, paraphraser_lr=0.1
    )
    para = list(ft.paraphrasers.parameters())
    assert para and not any(p.requires_grad for p in para)  # frozen from setup on
    g = torch.Generator().manual_seed(3)
    batches = [
        Batch(10 * torch.randn(8, *batch.x.shape[1:], generator=g), torch.zeros(8, dtype=torch.long), torch.arange(8))
        for _ in range(3)
    ]

    def teacher_batches():
        return (scheme.teachers[0].runner(b.x) for b in batches)

    before = ft.reconstruction_error(teacher_batches)
    scheme.prepare(batches)
    after = ft.reconstruction_error(teacher_batches)
    assert after < 0.6 * before
    assert not any(p.requires_grad for p in para) and not ft.paraphrasers.training
    scheme.module.train()
    assert not ft.paraphrasers.training  # stays in eval inside a training module
    opt = build_optimizer(scheme.module, OptimizerConfig(name="sgd", lr=0.1))
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not held & {id(p) for p in para} and {id(p) for p in ft.translators.parameters()} <= held
    step(scheme, teacher, batch)
    assert all(p.grad is None for p in para)
    assert all(p.grad is not None for p in ft.translators.parameters())


def test_ft_options():
    scheme, ft, teacher, batch = build("ft", "1d", paraphraser_epochs=0, rec_loss="l1", k=0.25, p=2)
    assert ft.pairs == [("blocks.1", "blocks.2")]  # default: last stage of each model
    w = [p.clone() for p in ft.paraphrasers.parameters()]
    scheme.prepare([batch])  # 0 epochs: nothing trains
    assert all(torch.equal(a, b) for a, b in zip(w, ft.paraphrasers.parameters()))
    assert ft.paraphrasers[0].encoder[-2].out_channels == 4  # round(0.25 * 16)
    step(scheme, teacher, batch)


# ----------------------------------------------------------------------------------- VID
def test_vid_equals_gaussian_nll_minus_constant():
    g = torch.Generator().manual_seed(0)
    mean, target = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    alpha = torch.randn(3, generator=g)
    var = torch.log1p(torch.exp(alpha)) + 1e-5  # (C,)
    normal = torch.distributions.Normal(mean, var.sqrt().view(1, 3, 1))
    expected = (-normal.log_prob(target)).mean() - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(vid_nll(mean, target, alpha, 1e-5), expected, atol=1e-6)
    loop = np.mean(
        [
            0.5 * (math.log(var[c]) + (target[b, c, x] - mean[b, c, x]).item() ** 2 / var[c].item())
            for b in range(4)
            for c in range(3)
            for x in range(5)
        ]
    )
    assert abs(vid_nll(mean, target, alpha, 1e-5).item() - loop) < 1e-5


@pytest.mark.parametrize("dims", ["1d", "2d"])
def test_vid_trains_and_gradient_reaches_alpha(dims):
    s_taps, t_taps = TAPS[dims]
    scheme, vid, teacher, batch = build("vid", dims, student_taps=s_taps, teacher_taps=t_taps)
    assert len(vid.regressors) == 2
    assert torch.allclose(F.softplus(vid.alphas[0]) + 1e-5, torch.full_like(vid.alphas[0], 5.0))  # init var 5
    step(scheme, teacher, batch)
    assert_trains(vid)
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in vid.alphas)


def test_vid_mid_channels_option():
    _, vid, _, _ = build("vid", "1d", mid_channels=7)
    assert vid.regressors[0][0].out_channels == 7 and vid.regressors[0][-1].out_channels == 16


# ----------------------------------------------------------------------------------- OFD
def test_ofd_partial_l2_by_hand_and_by_loop():
    margin = torch.tensor([-0.5, -1.0])
    t = torch.tensor([[[-1.0, 2.0], [-0.2, -3.0]]])  # (1, 2, 2); targets (-0.5, 2), (-0.2, -1)
    s = torch.tensor([[[-2.0, 1.0], [0.3, -0.5]]])
    # skipped: s=-2 <= -0.5 <= 0; kept: (1-2)^2, (0.3+0.2)^2, (-0.5+1)^2
    assert abs(ofd_partial_l2(s, t, margin).item() - 1.5) < 1e-6
    g = torch.Generator().manual_seed(0)
    s, t, margin = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g), -torch.rand(4, generator=g)
    ref = 0.0
    for b, c, x in np.ndindex(3, 4, 5):
        tt = max(t[b, c, x].item(), margin[c].item())
        ss = s[b, c, x].item()
        ref += 0.0 if ss <= tt <= 0 else (ss - tt) ** 2
    assert abs(ofd_partial_l2(s, t, margin).item() - ref) < 1e-4


def test_ofd_margin_of_a_known_gaussian():
    mu, sd = torch.tensor([0.5, -1.0, 4.0]), torch.tensor([1.5, 0.5, 1.0])
    # closed form against numerical integration of x * pdf over x < 0
    xs = np.linspace(-20, 0, 400001)
    for m, s in zip(mu.tolist(), sd.tolist()):
        pdf = np.exp(-0.5 * ((xs - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        numeric = np.trapezoid(xs * pdf, xs) / np.trapezoid(pdf, xs)
        if m / s < 3:  # P(x < 0) > 0.001: exact; else the authors' -3 sd fallback
            assert abs(gaussian_margin(torch.tensor([m]), torch.tensor([s])).item() - numeric) < 1e-3
    assert gaussian_margin(mu, sd)[2].item() == pytest.approx(-3.0)
    # the data estimate (used for a general teacher) recovers the closed form
    g = torch.Generator().manual_seed(0)
    x = mu[:2].view(1, 2, 1) + sd[:2].view(1, 2, 1) * torch.randn(400, 2, 500, generator=g)
    est = margin_from_stats(*negative_stats(x))
    assert torch.allclose(est, gaussian_margin(mu[:2], sd[:2]), atol=0.02)
    assert margin_from_stats(*negative_stats(torch.rand(4, 3, 5))).abs().sum() == 0  # never negative -> 0


def test_ofd_default_taps_are_pre_relu():
    student, _, _ = models("1d")
    assert [pre_activation_tap(student, p) for p in student.feature_taps()] == ["blocks.0.1:input", "blocks.1.1:input"]
    resnet = create_model("resnet8", input_shape=(1, 8, 8))
    assert pre_activation_tap(resnet, "layer2") == "layer2.0.relu_out:input"
    cnn2d = create_model("cnn2d", input_shape=(1, 8, 8))
    assert pre_activation_tap(cnn2d, "blocks.0") == "blocks.0"  # ends in a max-pool: post-ReLU fallback
    _, ofd, _, _ = build("ofd", "1d")  # 2 student stages vs 3 teacher stages, aligned by depth
    assert ofd.pairs == [("blocks.0.1:input", "blocks.1.1:input"), ("blocks.1.1:input", "blocks.2.1:input")]


@pytest.mark.parametrize("dims", ["1d", "2d"])
def test_ofd_trains_with_margins_from_the_train_set(dims):
    s_taps, t_taps = PREACT_TAPS[dims]
    scheme, ofd, teacher, batch = build("ofd", dims, student_taps=s_taps, teacher_taps=t_taps)
    batches = [Batch(torch.randn_like(batch.x), batch.y, batch.idx) for _ in range(3)]
    scheme.prepare(batches)
    feats = [scheme.teachers[0].runner(b.x) for b in batches]
    for j, (_, tp) in enumerate(ofd.pairs):
        pooled = torch.cat([f.feature(tp) for f in feats])  # the whole "training set"
        assert torch.allclose(ofd.margins()[j], margin_from_stats(*negative_stats(pooled)), atol=1e-6)
        assert (ofd.margins()[j] < 0).all()  # pre-ReLU features do go negative
    loss = step(scheme, teacher, batch)
    assert_trains(ofd)
    # the value: sum_j partial_L2 / 2^(n-1-j) / (1000 B)
    with torch.no_grad():
        s_out, t_out = scheme.flow.run_view("student", batch.x), scheme.teachers[0].runner(batch.x)
        ref = sum(
            ofd_partial_l2(c(s_out.feature(sp)), t_out.feature(tp), m) / 2 ** (1 - j)
            for j, ((sp, tp), c, m) in enumerate(zip(ofd.pairs, ofd.connectors, ofd.margins()))
        )
    assert torch.allclose(loss.detach(), ref / (1000 * 6), rtol=1e-5)


def test_ofd_first_batch_option_skips_the_pass():
    scheme, ofd, _, batch = build("ofd", "1d", margin_from="first_batch")
    before = [m.clone() for m in ofd.margins()]
    scheme.prepare([Batch(5 * torch.randn_like(batch.x), batch.y, batch.idx)])
    assert all(torch.equal(a, b) for a, b in zip(before, ofd.margins()))


# ------------------------------------------------------------------------------ ReviewKD
def test_hcl_zero_and_hand_values():
    f = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4)]
    assert hcl(f, [x.clone() for x in f]).item() < 1e-12
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2): levels 4, 2 skipped, 1 kept
    expected = (7.5 + 0.5 * 2.5**2) / 1.5  # (mse + 1/2 * mse of the mean) / (1 + 1/2)
    assert abs(hcl([s], [torch.zeros_like(s)]).item() - expected) < 1e-6
    a, b = np.arange(8.0), np.zeros(8)  # 1-D map of length 8: all of 4, 2, 1 apply
    terms = [((a.reshape(k, -1).mean(1) - b.reshape(k, -1).mean(1)) ** 2).mean() for k in (8, 4, 2, 1)]
    ref = sum(w * v for w, v in zip((1, 0.5, 0.25, 0.125), terms)) / 1.875
    assert abs(hcl([torch.tensor(a).view(1, 1, 8)], [torch.tensor(b).view(1, 1, 8)]).item() - ref) < 1e-9


@pytest.mark.parametrize("dims", ["1d", "2d"])
def test_reviewkd_abf_outputs_match_teacher_shapes_and_train(dims):
    s_taps, t_taps = TAPS[dims]
    scheme, rkd, teacher, batch = build("reviewkd", dims, student_taps=s_taps, teacher_taps=t_taps)
    with torch.no_grad():
        s_out, t_out = scheme.flow.run_view("student", batch.x), scheme.teachers[0].runner(batch.x)
    t_feats = rkd.teacher_features(t_out)
    fused = rkd.fuse(rkd.student_features(s_out), [tuple(t.shape[2:]) for t in t_feats])
    assert [f.shape for f in fused] == [t.shape for t in t_feats]
    assert rkd.abfs[0].att_conv is not None and rkd.abfs[-1].att_conv is None  # deepest has nothing to fuse
    step(scheme, teacher, batch)
    assert_trains(rkd)


def test_reviewkd_penultimate_option():
    scheme, rkd, teacher, batch = build("reviewkd", "1d", penultimate=True)
    assert rkd.pairs[-1] == ("fc:input", "fc:input") and len(rkd.pairs) == 3
    assert rkd.abfs[-1].conv2[0].out_channels == 16 * 10  # teacher's flattened penultimate, as a length-1 map
    step(scheme, teacher, batch)
    assert_trains(rkd)
