"""FitNets, attention transfer, NST and activation-boundary losses: math, training, options."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses import create_loss
from darkknowledge.losses.ab import ab_loss
from darkknowledge.losses.at import at_loss, attention_map
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.feature import pre_activation_tap
from darkknowledge.losses.fitnet import hint_loss
from darkknowledge.losses.nst import nst_loss
from darkknowledge.losses.objective import Objective
from darkknowledge.models import create_model
from darkknowledge.schemes.offline import offline_task


# ------------------------------------------------------------------------------------ AT
def test_at_identical_and_positive_scale_give_zero():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 4, 5, 6, generator=g)
    assert at_loss(f, f.clone()).item() < 1e-12
    assert at_loss(2.5 * f, f).item() < 1e-12  # Q is invariant to a positive scale
    other = torch.randn(3, 7, 5, 6, generator=g)  # channel counts may differ
    assert torch.allclose(at_loss(3.0 * other, f), at_loss(other, f), atol=1e-7)


def test_at_matches_numpy_on_1d_maps():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 6, 5, generator=g)

    def q(x):
        a = (np.abs(x.numpy()) ** 2).mean(axis=1)  # (B, L)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expected = ((q(s) - q(t)) ** 2).mean()
    assert abs(at_loss(s, t).item() - expected) < 1e-6
    assert attention_map(s).shape == (2, 5)


def test_at_resizes_the_student_map_and_rejects_vectors():
    g = torch.Generator().manual_seed(2)
    big, small = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    assert torch.allclose(at_loss(big, small), at_loss(F.adaptive_avg_pool2d(big, 4), small))
    assert torch.isfinite(at_loss(small, big))  # smaller student map: interpolated up
    with pytest.raises(ShapeError, match=r"\(2, 16\)"):
        at_loss(torch.randn(2, 16), torch.randn(2, 16))


# ----------------------------------------------------------------------------------- NST
def _mmd_loop(s, t, d=2, c=0.0):
    """Per-sample MMD^2 with explicit loops over channels, averaged over the batch."""
    total = 0.0
    for b in range(s.shape[0]):
        xs = [v / np.linalg.norm(v) for v in s[b].reshape(s.shape[1], -1).numpy().astype(np.float64)]
        xt = [v / np.linalg.norm(v) for v in t[b].reshape(t.shape[1], -1).numpy().astype(np.float64)]

        def k(x, y):
            return (float(x @ y) + c) ** d

        kss = sum(k(x, y) for x in xs for y in xs) / len(xs) ** 2
        ktt = sum(k(x, y) for x in xt for y in xt) / len(xt) ** 2
        kst = sum(k(x, y) for x in xs for y in xt) / (len(xs) * len(xt))
        total += kss + ktt - 2 * kst
    return total / s.shape[0]


def test_nst_identical_is_zero_and_matches_a_double_loop():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 4, 3, generator=g), torch.randn(2, 5, 4, 3, generator=g)
    assert abs(nst_loss(t, t.clone()).item()) < 1e-6
    assert abs(nst_loss(s, t).item() - _mmd_loop(s, t)) < 1e-5
    assert abs(nst_loss(s, t, degree=3, c=0.5).item() - _mmd_loop(s, t, 3, 0.5)) < 1e-4
    s1, t1 = torch.randn(2, 4, 7, generator=g), torch.randn(2, 6, 7, generator=g)  # 1-D maps
    assert abs(nst_loss(s1, t1).item() - _mmd_loop(s1, t1)) < 1e-5


def test_nst_compares_sets_of_neurons():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 4, 9, generator=g), torch.randn(2, 6, 9, generator=g)
    perm = torch.randperm(4, generator=g)
    assert torch.allclose(nst_loss(s[:, perm], t), nst_loss(s, t), atol=1e-6)  # channel order is irrelevant
    # linear kernel: MMD^2 = || mean_i s_i - mean_j t_j ||^2 of the normalized neuron maps
    mu_s, mu_t = F.normalize(s, dim=2).mean(1), F.normalize(t, dim=2).mean(1)
    assert torch.allclose(nst_loss(s, t, degree=1), ((mu_s - mu_t) ** 2).sum(1).mean(), atol=1e-6)
    with pytest.raises(ShapeError):
        nst_loss(torch.randn(2, 8), torch.randn(2, 8))


# -------------------------------------------------------------------------------- FitNet
def test_hint_loss_is_mean_squared_error():
    a, b = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    assert hint_loss(a, b).item() == pytest.approx((1 + 4 + 4 + 4) / 4)
    assert hint_loss(b, b.clone()).item() == 0.0


def test_fitnet_default_keeps_the_middle_stage():
    student = create_model("cnn1d", num_classes=10, input_shape=(40,), channels=8)
    teacher = create_model("cnn1d", num_classes=10, input_shape=(40,), channels=32)
    needs = create_loss("fitnet").bind(student, teacher)
    assert needs.student_taps == ("blocks.1",) and needs.teacher_taps == ("blocks.1",)
    explicit = create_loss("fitnet", student_taps=["blocks.0", "blocks.2"], teacher_taps=["blocks.0", "blocks.2"])
    assert explicit.bind(student, teacher).student_taps == ("blocks.0", "blocks.2")


# ------------------------------------------------------------------------------------ AB
def test_ab_hand_computed_value():
    s = torch.tensor([[-2.0, -0.5, 0.5, 2.0]])  # connector output, margin 1
    t = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    # -2 (t on, s <= 1): (-2-1)^2 = 9; -0.5 (t off, s > -1): 0.5^2; 0.5 (t on): 0.5^2; 2 (t off): 3^2
    assert ab_loss(s, t, 1.0).item() == pytest.approx(18.5)
    right_side = torch.tensor([[2.0, -2.0, 1.5, -1.0]])  # beyond the margin on the teacher's side
    assert ab_loss(right_side, t, 1.0).item() == 0.0
    assert ab_loss(torch.cat([s, s]), torch.cat([t, t]), 1.0).item() == pytest.approx(18.5)  # mean over batch


def test_ab_resolves_pre_relu_taps():
    cnn1d = create_model("cnn1d", num_classes=10, input_shape=(40,), channels=8)
    resnet = create_model("resnet8", num_classes=10, input_shape=(3, 16, 16))
    cnn2d = create_model("cnn2d", num_classes=10, input_shape=(1, 8, 8), channels=(4, 8))
    assert pre_activation_tap(cnn1d, "blocks.0") == "blocks.0.1:input"
    assert pre_activation_tap(resnet, "layer2") == "layer2.0.relu_out:input"
    assert pre_activation_tap(cnn2d, "blocks.0") == "blocks.0"  # ReLU then max-pool: kept as is
    assert pre_activation_tap(resnet, "fc:input") == "fc:input"
    teacher = create_model("cnn1d", num_classes=10, input_shape=(40,), channels=32)
    needs = create_loss("ab").bind(cnn1d, teacher)
    assert needs.student_taps == ("blocks.0.1:input", "blocks.1.1:input", "blocks.2.1:input")


# ---------------------------------------------------------------------- training in a scheme
STUDENT_TAPS = ["blocks.0", "blocks.0"]
TEACHER_TAPS = ["layer1", "layer3"]  # student 4x(8x8) vs teacher 16x(16x16) and 64x(4x4)
ADAPTED = {"fitnet": "regressors", "ab": "connectors"}


@pytest.mark.parametrize("name", ["fitnet", "at", "nst", "ab"])
def test_trains_between_different_models(name):
    torch.manual_seed(0)
    student = create_model("cnn2d", num_classes=5, input_shape=(3, 16, 16), channels=(4, 8), hidden=16)
    teacher = create_model("resnet8", num_classes=5, input_shape=(3, 16, 16))
    taps = TEACHER_TAPS if name != "ab" else ["layer1.0.relu_out:input", "layer3.0.relu_out:input"]
    loss = create_loss(name, student_taps=STUDENT_TAPS, teacher_taps=taps)
    scheme = offline_task(student, Objective({name: loss}), teacher)
    batch = Batch(torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0]), torch.arange(6))
    scheme.setup(batch, SetupInfo(num_samples=6, batch_size=6))
    total, _ = scheme.module.train()(batch)
    assert torch.isfinite(total) and total.item() > 0
    total.backward()
    assert student.blocks[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    if name in ADAPTED:
        adapters = getattr(loss, ADAPTED[name])
        assert len(adapters) == 2
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters() if p.dim() > 1)


@pytest.mark.parametrize("name", ["at", "nst"])
def test_map_losses_reject_vector_taps(name):
    student = create_model("cnn2d", num_classes=5, input_shape=(1, 8, 8), channels=(4,), hidden=16)
    teacher = create_model("cnn2d", num_classes=5, input_shape=(1, 8, 8), channels=(8,), hidden=16)
    loss = create_loss(name, student_taps=["fc:input"], teacher_taps=["fc:input"])
    scheme = offline_task(student, Objective({name: loss}), teacher)
    batch = Batch(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), torch.arange(4))
    with pytest.raises(ShapeError, match=r"student tap 'fc:input' has shape \(4, 16\)"):
        scheme.setup(batch)


# ------------------------------------------------------------------- stage-wise options
def _mnist1d_pair(teacher_depth=4):
    torch.manual_seed(0)
    student = create_model("cnn1d", num_classes=10, input_shape=(40,), channels=8)
    teacher = create_model("cnn1d", num_classes=10, input_shape=(40,), channels=32, depth=teacher_depth)
    batch = Batch(torch.randn(8, 40), torch.tensor([0, 1, 2, 3, 4, 5, -1, -1]), torch.arange(8))
    return student, teacher, batch


def _grad_norms(module, epoch_progress, scheme, batch):
    module.zero_grad(set_to_none=True)
    total, _ = module(batch, epoch_progress)
    total.backward()
    return {n: (p.grad.abs().sum().item() if p.grad is not None else 0.0) for n, p in module.named_parameters()}


@pytest.mark.parametrize("name", ["fitnet", "ab"])
def test_hint_stage_trains_only_up_to_the_guided_layer(name):
    """Stage 1 (epoch < 2): only the hint term counts; stage 2: CE + KD train everything."""
    student, teacher, batch = _mnist1d_pair()
    objective = Objective.from_config(
        {name: {"stop_epoch": 2}, "ce": {"start_epoch": 2}, "kd": {"alpha": 1.0, "start_epoch": 2}}
    )
    scheme = offline_task(student, objective, teacher)
    scheme.setup(batch)
    module = scheme.module.train()
    grads = _grad_norms(module, 1.5, scheme, batch)
    guided = ("blocks.0", "blocks.1") if name == "fitnet" else ("blocks.0", "blocks.1", "blocks.2")
    adapter = "regressors" if name == "fitnet" else "connectors"
    for n, g in grads.items():
        inside = n.startswith(tuple(f"student.{b}." for b in guided)) or f".{adapter}." in n
        if n.endswith("bias") and f".{adapter}." in n:
            continue  # a BN shift before a ReLU can be legitimately ~0
        assert (g > 0) == inside, (n, g)
    later = _grad_norms(module, 2.0, scheme, batch)
    assert later["student.fc.weight"] > 0 and later["student.blocks.2.0.weight"] > 0
    assert all(g == 0 for n, g in later.items() if f".{adapter}." in n)


def test_fitnet_regressor_relu_option():
    student, teacher, batch = _mnist1d_pair(teacher_depth=3)
    for relu, last in ((True, torch.nn.ReLU), (False, torch.nn.BatchNorm1d)):
        loss = create_loss("fitnet", relu=relu)
        scheme = offline_task(student, Objective({"fitnet": loss}), teacher)
        scheme.setup(batch)
        assert isinstance(list(loss.regressors[0].modules())[-1], last)


def test_ab_layer_weights_double_with_depth():
    s = [torch.randn(2, 3, 5) for _ in range(3)]
    t = [torch.randn(2, 3, 5) for _ in range(3)]
    loss = create_loss("ab", margin=0.5, student_taps=["a", "b", "c"], teacher_taps=["x", "y", "z"])
    loss.pairs = list(zip(["a", "b", "c"], ["x", "y", "z"]))
    loss.setup(Outputs(None, dict(zip("abc", s))), Outputs(None, dict(zip("xyz", t))), SetupInfo())
    loss.eval()
    value = loss(Outputs(None, dict(zip("abc", s))), Outputs(None, dict(zip("xyz", t))), None)
    parts = [ab_loss(c(x), y, 0.5) for c, x, y in zip(loss.connectors, s, t)]
    assert torch.allclose(value, parts[0] / 4 + parts[1] / 2 + parts[2])
