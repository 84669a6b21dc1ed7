"""LeanStep: the fused kernels called directly give exactly ``optimizer.step()``'s update."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from darkknowledge.engine.lean_step import LeanStep


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def _pair(make):
    ref, lean = _net(), _net()
    return ref, make(ref.parameters()), lean, make(lean.parameters())


OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "sgd_nesterov_wd": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True
    ),
    "sgd_plain": lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95), fused=True),
    "adam_wd": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
}


def _grads(model: nn.Module, seed: int, skip: int | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(model.parameters()):
        p.grad = None if i == skip else torch.randn(p.shape, generator=g)


def _same(a: nn.Module, b: nn.Module, oa: torch.optim.Optimizer, ob: torch.optim.Optimizer) -> None:
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for key, value in sa["state"][k].items():
            assert torch.equal(value, sb["state"][k][key]), (k, key)


def _step_both(ref, opt_ref, lean, opt_lean, stepper: LeanStep, step: int, skip: int | None = None) -> None:
    """The same gradients into both models, one step each (``optimizer.step()`` vs the
    shortcut), then parameters and optimizer states compared exactly."""
    _grads(ref, step, skip)
    _grads(lean, step, skip)
    opt_ref.step()
    stepper.step()
    _same(ref, lean, opt_ref, opt_lean)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_lean_steps_equal_optimizer_steps_with_a_changing_lr(name: str) -> None:
    ref, opt_ref, lean, opt_lean = _pair(OPTIMIZERS[name])
    stepper = LeanStep(opt_lean)
    for step in range(6):
        for opt in (opt_ref, opt_lean):
            for group in opt.param_groups:
                group["lr"] = group["lr"] * 0.7  # a schedule between steps
        _step_both(ref, opt_ref, lean, opt_lean, stepper, step)
    assert stepper.lean_steps == 5  # the first step creates the state through optimizer.step()


def test_a_missing_gradient_takes_the_optimizer_path() -> None:
    ref, opt_ref, lean, opt_lean = _pair(OPTIMIZERS["sgd_momentum"])
    stepper = LeanStep(opt_lean)
    for step in range(4):
        _step_both(ref, opt_ref, lean, opt_lean, stepper, step, skip=1 if step == 2 else None)
    assert stepper.lean_steps == 2  # steps 1 and 3


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),  # not fused
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, fused=True),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
    ],
)
def test_unsupported_optimizers_always_use_their_own_step(make) -> None:
    ref, opt_ref, lean, opt_lean = _pair(make)
    stepper = LeanStep(opt_lean)
    for step in range(3):
        _step_both(ref, opt_ref, lean, opt_lean, stepper, step)
    assert stepper.lean_steps == 0


def test_step_hooks_still_run() -> None:
    _, _, lean, opt = _pair(OPTIMIZERS["adam"])
    stepper = LeanStep(opt)
    calls = []
    _grads(lean, 0)
    stepper.step()
    opt.register_step_post_hook(lambda *_: calls.append(1))
    _grads(lean, 1)
    stepper.step()
    assert calls == [1] and stepper.lean_steps == 0


def test_reset_after_loading_a_state_uses_the_loaded_tensors() -> None:
    ref, opt_ref, lean, opt_lean = _pair(OPTIMIZERS["adamw"])
    stepper = LeanStep(opt_lean)
    for step in range(3):
        _grads(ref, step)
        _grads(lean, step)
        opt_ref.step()
        stepper.step()
    saved = copy.deepcopy(opt_ref.state_dict())
    opt_lean.load_state_dict(saved)
    stepper.reset()
    _grads(ref, 9)
    _grads(lean, 9)
    opt_ref.step()
    stepper.step()
    _grads(ref, 10)
    _grads(lean, 10)
    opt_ref.step()
    stepper.step()
    _same(ref, lean, opt_ref, opt_lean)
    assert stepper.lean_steps == 3  # steps 1, 2 and the one after the re-capture


@pytest.mark.parametrize(
    "optimizer", [{"name": "sgd", "lr": 0.05}, {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}]
)
def test_the_trainer_steps_through_the_shortcut_to_the_same_weights(monkeypatch, optimizer) -> None:
    from darkknowledge.config import TrainConfig
    from darkknowledge.data import BatchLoader, TensorData
    from darkknowledge.engine import stepper as stepper_module
    from darkknowledge.engine import trainer as trainer_module
    from darkknowledge.models import create_model
    from darkknowledge.runs.build import build_objective
    from darkknowledge.schemes.offline import offline_task

    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(96, 12, generator=g), torch.randint(0, 4, (96,), generator=g))
    steppers: list[LeanStep] = []

    class Recorded(LeanStep):
        def __init__(self, opt: torch.optim.Optimizer, lean: bool) -> None:
            super().__init__(opt)
            if not lean:
                self.kind = None  # never captures: every step is optimizer.step()
            steppers.append(self)

    weights = []
    for lean in (True, False):
        monkeypatch.setattr(stepper_module, "LeanStep", lambda opt, lean=lean: Recorded(opt, lean))
        torch.manual_seed(1)
        student = create_model("mlp", num_classes=4, input_shape=(12,), hidden=[16])
        cfg = TrainConfig(epochs=2, device="cpu", optimizer=optimizer, scheduler={"name": "cosine"})
        trainer_module.Trainer(
            offline_task(student, build_objective({"ce": {}})),
            BatchLoader(data, 32, seed=0),
            BatchLoader(data, 96, shuffle=False),
            cfg,
            torch.device("cpu"),
            progress=False,
        ).fit()
        weights.append(student.state_dict())
    assert steppers[0].lean_steps == 5 and steppers[1].lean_steps == 0  # 6 steps, the first creates the state
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw"])
def test_a_torch_without_the_kernel_signature_falls_back_for_good(monkeypatch, name) -> None:
    from darkknowledge.engine import lean_step

    def other_signature(*args, **kwargs):
        raise TypeError("_fused_x_() got an unexpected keyword argument")

    monkeypatch.setattr(torch, "_dk_test_kernel", other_signature, raising=False)
    monkeypatch.setitem(lean_step.KERNELS, "sgd", "_dk_test_kernel")
    monkeypatch.setitem(lean_step.KERNELS, "adamw", "_dk_test_kernel")
    ref, opt_ref, lean, opt_lean = _pair(OPTIMIZERS[name])
    stepper = LeanStep(opt_lean)
    for step in range(4):
        _step_both(ref, opt_ref, lean, opt_lean, stepper, step)  # Adam's step count was not advanced twice
    assert stepper.lean_steps == 0 and stepper.kind is None
