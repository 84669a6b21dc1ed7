"""Engine behaviour: adapters trained with the student, accumulation, AMP, schedules, teacher mode."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import darkknowledge as dk
from darkknowledge.config import SchedulerConfig
from darkknowledge.data.batch import Batch
from darkknowledge.engine.optim import lr_factor
from darkknowledge.errors import ShapeError
from darkknowledge.losses.adapters import build_adapter
from darkknowledge.losses.base import DistillLoss, Needs
from darkknowledge.losses.objective import Objective
from darkknowledge.models import create_model
from darkknowledge.schemes.offline import offline_task


class HintForTest(DistillLoss):
    """A FitNets-style hint: MSE between adapted student and teacher features (test only)."""

    knowledge = "feature"
    citation = "test"
    needs_spec = Needs(teacher=True)  # reads the teacher (known before binding)

    def __init__(self, s_tap: str, t_tap: str) -> None:
        super().__init__()
        self.s_tap, self.t_tap = s_tap, t_tap
        self.adapter: nn.Module | None = None

    def bind(self, student, teacher):
        return Needs(teacher=True, student_taps=(self.s_tap,), teacher_taps=(self.t_tap,))

    def setup(self, student, teacher, info):
        s, t = student.feature(self.s_tap), teacher.feature(self.t_tap)
        self.adapter = build_adapter(tuple(s.shape[1:]), tuple(t.shape[1:]))

    def forward(self, student, teacher, batch):
        return F.mse_loss(self.adapter(student.feature(self.s_tap)), teacher.feature(self.t_tap))


@pytest.mark.parametrize(
    ("s_shape", "t_shape", "kind"),
    [((8,), (16,), nn.Linear), ((4, 10), (8, 5), nn.Sequential), ((4, 8, 8), (16, 4, 4), nn.Sequential)],
)
def test_build_adapter_maps_shapes(s_shape, t_shape, kind):
    adapter = build_adapter(s_shape, t_shape)
    assert isinstance(adapter, kind)
    assert adapter(torch.randn(3, *s_shape)).shape == (3, *t_shape)
    assert isinstance(build_adapter(s_shape, s_shape), nn.Identity)
    with pytest.raises(ShapeError, match=r"\(8,\).*\(4, 8, 8\)"):
        build_adapter((8,), (4, 8, 8))


def test_adapters_built_from_dry_run_and_trained_with_student():
    torch.manual_seed(0)
    student = create_model("cnn2d", num_classes=5, input_shape=(1, 8, 8), channels=(4, 8), hidden=16)
    teacher = create_model("cnn2d", num_classes=5, input_shape=(1, 8, 8), channels=(8, 16), hidden=32)
    loss = HintForTest("blocks.1", "blocks.1")
    scheme = offline_task(student, Objective({"hint": loss, "kd": dk.create_loss("kd")}), teacher)
    batch = Batch(torch.randn(6, 1, 8, 8), torch.arange(6) % 5, torch.arange(6))
    scheme.setup(batch)
    assert loss.adapter is not None  # no channel count was typed anywhere
    names = [n for n, _ in scheme.module.named_parameters()]
    assert any(n.startswith("objective.terms.hint.adapter") for n in names)
    assert not any("teacher" in n for n in names)  # the teacher is not part of the trainable module
    total, terms = scheme.module(batch)  # the frozen teacher runs inside the step
    total.backward()
    assert all(p.grad is not None for p in loss.adapter.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert scheme.describe()["adapter_params"] == sum(p.numel() for p in loss.adapter.parameters())


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return (x, y), (x[:40], y[:40])


def test_gradient_accumulation_equals_the_big_batch():
    kw = dict(epochs=1, lr=0.1, optimizer="sgd", seed=0)
    cfg = {"train": {"optimizer": {"momentum": 0.0}, "scheduler": {"name": "constant"}}}
    big = dk.train("mlp", _data(), batch_size=40, config=cfg, **kw).model
    acc_cfg = {"train": {**cfg["train"], "grad_accum": 2}}
    small = dk.train("mlp", _data(), batch_size=20, config=acc_cfg, **kw).model
    for (k, a), b in zip(big.state_dict().items(), small.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_bf16_autocast_on_cpu_trains():
    out = dk.train("mlp", _data(), epochs=2, batch_size=20, lr=0.01, config={"train": {"amp": "bf16"}})
    assert out.accuracy > 25.0 and out.model.fc.weight.dtype == torch.float32


def test_fp16_on_cpu_is_refused():
    from darkknowledge.errors import ConfigError

    with pytest.raises(ConfigError, match="fp16 autocast needs a GPU"):
        dk.train("mlp", _data(), epochs=1, config={"train": {"amp": "fp16", "device": "cpu"}})


def test_lr_schedules():
    warm = SchedulerConfig(name="cosine", warmup_epochs=1)
    assert lr_factor(warm, 0, 10, 5) == pytest.approx(0.1)
    assert lr_factor(warm, 10, 10, 5) == pytest.approx(1.0)
    assert lr_factor(warm, 49, 10, 5) < 0.01
    step = SchedulerConfig(name="step", step_size=2, gamma=0.5)
    assert [lr_factor(step, e * 10, 10, 6) for e in range(5)] == [1, 1, 0.5, 0.5, 0.25]
    multi = SchedulerConfig(name="multistep", milestones=[3, 4], gamma=0.1)
    assert lr_factor(multi, 35, 10, 5) == pytest.approx(0.1) and lr_factor(multi, 45, 10, 5) == pytest.approx(0.01)


def test_teacher_stays_in_eval_and_unchanged_during_distillation():
    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 4))
            self.modes, self.grad_modes = [], []

        def forward(self, x):
            self.modes.append(self.training)
            self.grad_modes.append(torch.is_inference_mode_enabled())
            return self.net(x)

    teacher = Spy()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    dk.distill("mlp", teacher, _data(), epochs=2, batch_size=40, lr=0.01)
    assert teacher.modes and not any(teacher.modes)
    assert all(teacher.grad_modes)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_teacher_forward_skipped_when_nothing_needs_it():
    calls = []
    teacher = create_model("mlp", num_classes=4, input_shape=(6,))
    teacher.register_forward_hook(lambda *a: calls.append(1))
    scheme = offline_task(
        create_model("mlp", num_classes=4, input_shape=(6,)), Objective.from_config({"ce": {}}), teacher
    )
    assert scheme.teachers == []
    batch = Batch(torch.randn(4, 6), torch.zeros(4, dtype=torch.long), torch.arange(4))
    scheme.setup(batch)
    loss, terms = scheme.module(batch)
    assert set(terms) == {"ce"} and torch.isfinite(loss) and not calls


def test_feature_loss_runs_through_evaluation_epochs():
    """Student taps record only inside the training forward, never during evaluation."""
    from darkknowledge.data import load_dataset

    bundle = load_dataset("digits")
    teacher = create_model("cnn2d", num_classes=10, input_shape=(1, 8, 8), channels=(8, 16), hidden=16)
    taps = {"student_taps": ["blocks.1"], "teacher_taps": ["blocks.1"]}
    out = dk.distill(
        "cnn2d",
        teacher,
        bundle,
        losses={"ce": {}, "hint": {"loss": "fitnet", **taps}},
        epochs=2,
        batch_size=256,
        config={"student": {"params": {"channels": [4, 8], "hidden": 16}}},
    )
    assert out.entry["epochs"] == 2


def test_one_teacher_teaches_several_students_in_turn():
    """A teacher object reused across runs (dk run's seeds) is not disturbed by earlier runs' hooks."""
    x = torch.randn(4, 1, 8, 8)
    batch = Batch(x, torch.arange(4) % 5, torch.arange(4))
    teacher = create_model("cnn2d", num_classes=5, input_shape=(1, 8, 8), channels=(8, 16), hidden=16)
    for _ in range(2):
        student = create_model("cnn2d", num_classes=5, input_shape=(1, 8, 8), channels=(4, 8), hidden=16)
        scheme = offline_task(student, Objective.from_config({"at": {}}), teacher)
        scheme.setup(batch)
        for _ in range(2):
            loss, _ = scheme.module(batch)
        teacher(x)  # the user's own calls record nothing either
    assert torch.isfinite(loss)
