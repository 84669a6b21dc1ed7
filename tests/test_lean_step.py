"""The lean training step: fused optimizer updates, the light LR schedule, and cross-entropy
without label counting when the loader knows every sample is labelled. Each shortcut must
compute exactly what the longer path computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.config import OptimizerConfig, SchedulerConfig
from darkknowledge.data import BatchLoader, TensorData
from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.engine.optim import StepSchedule, build_optimizer, build_scheduler, load_optimizer_state, lr_factor
from darkknowledge.losses import fused
from darkknowledge.losses.base import Outputs
from darkknowledge.losses.ce import CrossEntropy, cross_entropy
from darkknowledge.losses.kd import KD, kd_soft_loss


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def _train(opt_cfg: OptimizerConfig, steps: int = 5) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = _net()
    opt = build_optimizer(net, opt_cfg)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        F.cross_entropy(net(x), y).backward()
        opt.step()
        net.zero_grad(set_to_none=True)
    return net, opt


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_updates_match_the_default_implementation(name):
    cfg = dict(name=name, lr=0.05, weight_decay=1e-3, nesterov=name == "sgd")
    fused, fused_opt = _train(OptimizerConfig(**cfg))
    plain, plain_opt = _train(OptimizerConfig(**cfg, fused=False))
    assert all(g["fused"] for g in fused_opt.param_groups)  # CPU has fused kernels in this torch
    assert not any(g.get("fused") for g in plain_opt.param_groups)
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused[0].weight, _net()[0].weight)  # it did train


def test_parameter_groups_split_only_for_weight_decay():
    net = _net()
    (one,) = build_optimizer(net, OptimizerConfig(name="sgd", lr=0.1)).param_groups
    assert len(one["params"]) == len(list(net.parameters()))
    decay, no_decay = build_optimizer(net, OptimizerConfig(name="sgd", lr=0.1, weight_decay=0.1)).param_groups
    assert all(p.ndim == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_step_schedule_follows_lambda_lr_and_resumes_from_either():
    cfg = SchedulerConfig(name="cosine", warmup_epochs=1, min_lr_ratio=0.1)
    ours_opt = torch.optim.SGD(
        [{"params": [nn.Parameter(torch.zeros(1))]}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.5}], lr=0.2
    )
    ref_opt = torch.optim.SGD(
        [{"params": [nn.Parameter(torch.zeros(1))]}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.5}], lr=0.2
    )
    ours = build_scheduler(ours_opt, cfg, steps_per_epoch=4, epochs=3)
    ref = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: lr_factor(cfg, s, 4, 3))
    seen = []
    for _ in range(12):
        assert ours.get_last_lr() == pytest.approx([g["lr"] for g in ref_opt.param_groups])
        seen.append(ours.get_last_lr()[0])
        ref_opt.step()
        ref.step()
        ours.step()
    assert len(set(seen)) > 8  # warm-up and decay, not a constant
    for state in (ours.state_dict(), ref.state_dict()):  # our checkpoints and LambdaLR ones
        opt = torch.optim.SGD(
            [{"params": [nn.Parameter(torch.zeros(1))]}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.5}], lr=0.2
        )
        resumed = StepSchedule(opt, lambda s: lr_factor(cfg, s, 4, 3))
        resumed.load_state_dict(state)
        assert resumed.last_epoch == 12
        assert resumed.get_last_lr() == pytest.approx(ours.get_last_lr())


def test_loader_marks_batches_labelled_only_when_every_sample_is():
    x = torch.randn(10, 3)
    full = BatchLoader(TensorData(x, torch.arange(10) % 3), 4, shuffle=False)
    assert all(b.labeled for b in full)
    some = BatchLoader(TensorData(x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, UNLABELED])), 4, shuffle=False)
    assert not any(b.labeled for b in some)  # known per dataset: no batch claims it
    generic = BatchLoader([(x[i], int(i < 8) - (i >= 8) * 1) for i in range(10)], 4, shuffle=False)
    assert [b.labeled for b in generic] == [True, True, False]  # per batch, from the CPU labels


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_labelled_cross_entropy_shortcut_equals_the_counting_path(smoothing):
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, 2, 1, 3, 2])
    fast = cross_entropy(z, y, smoothing, all_labeled=True)
    (g_fast,) = torch.autograd.grad(fast, z)
    slow = cross_entropy(z, y, smoothing)
    (g_slow,) = torch.autograd.grad(slow, z)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(g_fast, g_slow)
    torch.testing.assert_close(fast, F.cross_entropy(z, y, label_smoothing=smoothing))


@pytest.mark.parametrize("fast", [True, False])
def test_losses_pass_the_batch_flag_and_still_skip_unlabelled_rows_without_it(monkeypatch, fast):
    monkeypatch.setattr(fused, "ENABLED", fast)  # KD's fast path (losses/fused.py) and its textbook path
    z, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, UNLABELED, 2, 1])
    kept = torch.tensor([0, 2, 3])
    mixed = Batch(torch.zeros(4, 1), y, torch.arange(4))  # labeled=False: may hold unlabelled rows
    full = Batch(torch.zeros(3, 1), y[kept], kept, labeled=True)
    ce_kept = F.cross_entropy(z[kept], y[kept])
    torch.testing.assert_close(CrossEntropy()(Outputs(z), None, mixed), ce_kept)
    torch.testing.assert_close(CrossEntropy()(Outputs(z[kept]), None, full), ce_kept)
    kd = KD(T=2.0, alpha=0.25)
    torch.testing.assert_close(kd(Outputs(z), Outputs(t), mixed), 0.25 * kd_soft_loss(z, t, 2.0) + 0.75 * ce_kept)
    torch.testing.assert_close(
        kd(Outputs(z[kept]), Outputs(t[kept]), full), 0.25 * kd_soft_loss(z[kept], t[kept], 2.0) + 0.75 * ce_kept
    )


def test_a_checkpoint_of_the_old_two_group_optimizer_resumes_into_one_group():
    net = _net()
    params = list(net.parameters())
    old = torch.optim.SGD(
        [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": 0.0},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=0.1,
        momentum=0.9,
    )
    F.cross_entropy(net(torch.randn(8, 6)), torch.zeros(8, dtype=torch.long)).backward()
    old.step()
    new = build_optimizer(net, OptimizerConfig(name="sgd", lr=0.1))
    assert len(new.param_groups) == 1
    with pytest.raises(ValueError):
        new.load_state_dict(old.state_dict())  # what resuming did before the re-indexing
    load_optimizer_state(new, old.state_dict(), net)
    for p in params:  # each parameter got its own momentum back
        torch.testing.assert_close(new.state[p]["momentum_buffer"], old.state[p]["momentum_buffer"])
