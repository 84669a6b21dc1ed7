"""DeepInversion (Yin et al., CVPR 2020): BN statistics prior, image priors, competition, both modes."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from darkknowledge.data.seeds import make_generator
from darkknowledge.errors import ConfigError
from darkknowledge.synthesis import draw_latent, resolve_synthesizer
from darkknowledge.synthesis.bn_stats import (
    BNStatsHook,
    batch_statistics,
    bn_statistics_loss,
    find_batchnorms,
)
from darkknowledge.synthesis.deepinversion import (
    INIT_STREAM,
    competition_loss,
    latent_seed,
    total_variation,
)

K = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions run faster on one thread than on two shared ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def frozen_teacher(two_d: bool) -> nn.Module:
    """A tiny conv net with BN, trained briefly to tell K noisy patterns apart, then frozen."""
    torch.manual_seed(0)
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if two_d else (nn.Conv1d, nn.BatchNorm1d)
    pool = nn.AdaptiveAvgPool2d(1) if two_d else nn.AdaptiveAvgPool1d(1)
    net = nn.Sequential(
        conv(1, 4, 3, padding=1),
        bn(4),
        nn.ReLU(),
        conv(4, 6, 3, padding=1),
        bn(6),
        nn.ReLU(),
        pool,
        nn.Flatten(),
        nn.Linear(6, K),
    )
    patterns = torch.randn(K, 1, *((6, 6) if two_d else (12,))) + 1.0  # one "class look" each
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(60):
        y = torch.randint(0, K, (32,))
        x = patterns[y] + 0.5 * torch.randn_like(patterns[y])  # (32, 1, *S)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
        p.grad = None
    return net


def make(teacher: nn.Module, shape: tuple[int, ...], **params):
    cls, p = resolve_synthesizer("deepinversion", params)
    return cls(p, teacher, shape, K)


# ---------------------------------------------------------------- R_feature


def test_bn_loss_is_zero_when_the_batch_matches_the_running_statistics():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5) * 2 + 0.5
    layer = nn.BatchNorm2d(3).eval()
    mean, var = batch_statistics(x)
    layer.running_mean.copy_(mean)
    layer.running_var.copy_(var)
    with BNStatsHook({"bn": layer}) as hook:
        layer(x)
        assert float(hook.loss()) == pytest.approx(0.0, abs=1e-5)
    other = (x * 1.5 + 0.1).requires_grad_(True)
    with BNStatsHook({"bn": layer}) as hook:
        layer(other)
        loss = hook.loss()
    assert loss.item() > 0.1
    loss.backward()
    assert other.grad is not None and other.grad.abs().sum() > 0


def test_bn_loss_math_weights_and_statistics_of_every_rank():
    got = bn_statistics_loss([torch.tensor([1.0, 2.0])], [torch.tensor([4.0, 1.0])], [torch.zeros(2)], [torch.ones(2)])
    assert float(got) == pytest.approx(math.sqrt(5) + 3.0)  # ||(1,2)|| + ||(3,0)||
    two = bn_statistics_loss(
        [torch.ones(1), torch.ones(1)],
        [torch.ones(1), torch.ones(1)],
        [torch.zeros(1), torch.zeros(1)],
        [torch.ones(1), torch.ones(1)],
        weights=[10, 1],
    )
    assert float(two) == pytest.approx(11.0)
    for shape in [(6, 3), (6, 3, 7), (6, 3, 4, 5)]:
        x = torch.randn(shape)
        mean, var = batch_statistics(x)
        flat = x.transpose(0, 1).reshape(3, -1)  # (C, everything else)
        assert torch.allclose(mean, flat.mean(1), atol=1e-6) and torch.allclose(var, flat.var(1, unbiased=False))


def test_bn_layers_by_type_or_path_with_clear_errors():
    teacher = frozen_teacher(two_d=True)
    assert list(find_batchnorms(teacher)) == ["1", "4"]
    assert list(find_batchnorms(teacher, ["4"])) == ["4"]
    with pytest.raises(ConfigError, match=r"'3' is a Conv2d.*Batch-norm layers: 1, 4"):
        find_batchnorms(teacher, ["3"])
    with pytest.raises(ConfigError, match=r"'9' names no module.*Batch-norm layers: 1, 4"):
        find_batchnorms(teacher, ["9"])
    with pytest.raises(ConfigError, match="needs a teacher with batch-norm layers"):
        find_batchnorms(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="bn_layers"):
        make(teacher, (1, 6, 6), bn_layers=["0"])


# ---------------------------------------------------------------- priors and competition


def test_total_variation_is_zero_for_constants_and_known_otherwise():
    assert float(total_variation(torch.full((2, 3, 4, 4), 0.7))) == 0.0
    assert float(total_variation(torch.full((2, 3, 9), -1.0))) == 0.0
    img = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    assert float(total_variation(img)) == pytest.approx(math.sqrt(2) + 0 + 1 + 1)  # W, H, two diagonals
    sig = torch.tensor([0.0, 1.0, 3.0]).view(1, 1, 3)
    assert float(total_variation(sig)) == pytest.approx(math.sqrt(5))
    assert float(total_variation(torch.randn(2, 1, 5, 5))) > 0 and float(total_variation(torch.randn(2, 1, 5))) > 0


def test_competition_is_in_unit_interval_and_one_when_models_agree():
    torch.manual_seed(0)
    t = torch.randn(16, 5) * 4
    assert float(competition_loss(t, t.clone())) == pytest.approx(1.0)
    values = [float(competition_loss(t, torch.randn(16, 5) * s)) for s in (0.1, 1, 10, 100)]
    assert all(0.0 <= v <= 1.0 for v in values) and min(values) < 1.0
    opposite = competition_loss(torch.eye(5).repeat(2, 1) * 50, torch.eye(5).roll(1, 0).repeat(2, 1) * 50)
    assert 0.0 <= float(opposite) < 0.9


# ---------------------------------------------------------------- inputs mode


@pytest.mark.parametrize("two_d", [True, False], ids=["2d", "1d"])
def test_inversion_lowers_the_loss_and_the_teacher_learns_to_see_the_targets(two_d):
    teacher = frozen_teacher(two_d)
    shape = (1, 6, 6) if two_d else (1, 12)
    synth = make(teacher, shape, iterations=40, input_lr=0.1, bn=1.0, jitter=1, flip=two_d, latent_dim=4)
    latent = draw_latent(0, (0, 0), 24, 4, K)
    start = torch.randn((24, *shape), generator=make_generator(latent_seed(latent), INIT_STREAM))
    x = synth.invert(latent, None)
    before, terms0 = synth.objective(start, latent.y, None)
    after, terms1 = synth.objective(x, latent.y, None)
    assert float(after) < 0.5 * float(before)
    assert float(terms1["bn"]) < float(terms0["bn"])
    with torch.no_grad():
        acc0 = (teacher(start).argmax(1) == latent.y).float().mean()
        acc1 = (teacher(x).argmax(1) == latent.y).float().mean()
    assert acc1 > acc0 and acc1 >= 0.9
    assert all(p.grad is None for p in teacher.parameters())


def test_the_same_latent_gives_the_same_inputs_and_the_student_draws_from_the_pool():
    teacher = frozen_teacher(True)
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, K))
    a = make(teacher, (1, 6, 6), iterations=3, competition=0.2, latent_dim=4, pool_size=32, synthesize_every=2)
    b = make(teacher, (1, 6, 6), iterations=3, competition=0.2, latent_dim=4, pool_size=32, synthesize_every=2)
    l0, l1 = draw_latent(5, (0, 0), 8, 4, K), draw_latent(5, (0, 1), 8, 4, K)
    assert torch.equal(a.invert(l0, student), b.invert(l0, student))
    assert not torch.equal(a.invert(l0, student), a.invert(l1, student))
    assert a.parts() == []
    xa, xb = a.sample(l0, student), b.sample(l0, student)
    assert torch.equal(xa, xb) and xa.shape == (8, 1, 6, 6) and not xa.requires_grad
    assert int(a.pool.count) == 1 and int(a.batches) == 1
    a.sample(l1, student)  # batch 1: not due (synthesize_every 2), drawn from the pool
    assert int(a.pool.count) == 1
    a.sample(draw_latent(5, (0, 2), 8, 4, K), student)
    assert int(a.pool.count) == 2 and set(a.state_dict()) == {"pool.count", "batches"}
    assert all(p.grad is None for p in student.parameters())  # competition reached the inputs only


def test_explicit_priors_that_do_not_fit_the_inputs_are_refused():
    teacher = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, K)).eval()
    make(teacher, (5,), iterations=1)  # defaults (tv, jitter) simply do not apply to flat inputs
    with pytest.raises(ConfigError, match="jitter"):
        make(teacher, (5,), jitter=3)
    with pytest.raises(ConfigError, match="flip"):
        make(frozen_teacher(False), (1, 12), flip=True)


# ---------------------------------------------------------------- generator mode


def test_generator_mode_trains_part_generator_with_gradients_to_the_generator_only():
    teacher = frozen_teacher(True)
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, K))
    synth = make(
        teacher,
        (1, 6, 6),
        mode="generator",
        latent_dim=8,
        width=0.125,
        competition=0.5,
        optimizer={"lr": 0.01},
        synthesize_every=2,
    )
    parts = synth.parts()
    assert [p.name for p in parts] == ["generator"] and parts[0].module is synth.generator and parts[0].every == 2
    latent = draw_latent(1, (0, 0), 8, 8, K)
    loss, terms = synth.part_loss("generator", latent, student)
    assert set(terms) == {"ce", "bn", "tv", "l2", "competition"}
    loss.backward()
    assert all(p.grad is not None for p in synth.generator.parameters() if p.requires_grad)
    assert all(p.grad is None for p in student.parameters()) and all(p.grad is None for p in teacher.parameters())
    x = synth.sample(latent, student)
    assert x.shape == (8, 1, 6, 6) and not x.requires_grad


def test_a_resumed_synthesiser_serves_the_batches_the_uninterrupted_one_served(tmp_path):
    teacher = frozen_teacher(True)
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, K))
    latents = [draw_latent(9, (0, b), 4, 4, K) for b in range(4)]
    params = {"iterations": 2, "latent_dim": 4, "pool_size": 8}  # two batches visible
    straight = make(teacher, (1, 6, 6), **params)
    straight.use_directory(tmp_path / "straight")
    expected = [straight.sample(lat, student) for lat in latents]

    killed = make(teacher, (1, 6, 6), **params)
    killed.use_directory(tmp_path / "pool")
    for lat in latents[:2]:
        killed.sample(lat, student)
    checkpoint = {k: v.clone() for k, v in killed.state_dict().items()}  # last.pt after batch 1
    killed.saved()
    for lat in latents[2:]:
        killed.sample(lat, student)  # done, then killed before the next checkpoint

    resumed = make(teacher, (1, 6, 6), **params)
    resumed.load_state_dict(checkpoint)
    resumed.use_directory(tmp_path / "pool")
    assert [torch.equal(resumed.sample(lat, student), want) for lat, want in zip(latents[2:], expected[2:])] == [
        True,
        True,
    ]
    with pytest.raises(ConfigError, match="new directory"):
        other = frozen_teacher(True)
        with torch.no_grad():
            next(other.parameters()).add_(1.0)  # another teacher's weights
        make(other, (1, 6, 6), **params).use_directory(tmp_path / "pool")
