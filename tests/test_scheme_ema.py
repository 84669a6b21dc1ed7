"""Mean teacher: the EMA follows the student by the decay formula, gets no gradient, survives a resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from darkknowledge.commands import compare, distill
from darkknowledge.config import deep_merge, load_config
from darkknowledge.data.batch import Batch
from darkknowledge.engine.checkpoint import load_exported, safe_load
from darkknowledge.errors import ConfigError
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.models import create_model
from darkknowledge.runs.build import build_objective, check_config
from darkknowledge.schemes import SCHEMES
from darkknowledge.schemes.ema import MeanTeacher, ema_task
from darkknowledge.schemes.task import FlowTask
from darkknowledge.teachers.ema import EMA, effective_decay, ema_update
from helpers import TINY, dk, results

EMA_TINY = {
    "seeds": [0],
    "teacher": None,
    "losses": {"kd": {"T": 2.0, "alpha": 0.5}},
    "data": {"params": {"transfer_samples": 200}},
    "scheme": {"name": "ema", "params": {"decay": 0.9}},
    "train": {"epochs": 1},
}


def _cfg(**changes):
    return load_config(deep_merge(deep_merge(TINY, EMA_TINY), changes))


def _batch(n: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n))


def _task(**kw) -> FlowTask:
    torch.manual_seed(0)
    net = create_model("cnn1d", num_classes=10, input_shape=(40,), channels=4)
    task = ema_task(net, lambda: build_objective({"kd": {"T": 2.0, "alpha": 0.5}}), **kw)
    task.setup(_batch())
    return task


def _ema(task: FlowTask) -> EMA:
    (teacher,) = task.teachers
    assert isinstance(teacher, EMA)
    return teacher


def test_registered_with_citation():
    assert SCHEMES.get("ema") is MeanTeacher
    assert "Tarvainen" in MeanTeacher.citation and "NeurIPS 2017" in MeanTeacher.citation


def test_the_ema_starts_as_a_copy_and_gets_no_gradient():
    task = _task()
    student, ema = task.flow.student, _ema(task).model
    s, e = student.state_dict(), ema.state_dict()
    assert all(torch.equal(s[k], e[k]) for k in s)
    assert all(not p.requires_grad for p in ema.parameters())
    assert ema.dk_name == "cnn1d"  # a zoo model: exportable as is
    batch = _batch()
    loss, terms = task.training_step(task.module, batch, 0.0)
    loss.backward()
    assert set(terms) == {"kd"}
    assert all(p.grad is None for p in ema.parameters())
    assert all(p.grad is not None for p in student.parameters())
    opt_params = [p for p in task.module.parameters() if p.requires_grad]  # what the engine optimises
    assert {id(p) for p in opt_params} == {id(p) for p in student.parameters()}
    assert task.fingerprint() is None  # the EMA is checkpointed with the module, not a fixed teacher


def test_the_teacher_side_is_the_ema_model_and_is_constant():
    task = _task()
    student, teacher = task.flow.student, _ema(task)
    with torch.no_grad():  # make the two models differ
        for p in teacher.model.parameters():
            p.add_(0.1)
    batch = _batch()
    t = teacher(batch)
    assert not t.logits.requires_grad
    teacher.model.eval()
    assert torch.allclose(t.logits, teacher.model(batch.x))
    loss, _ = task.module(batch, 0.0)  # the teacher runs inside the step
    student_logits = student(batch.x)
    expected = 0.5 * kd_soft_loss(student_logits, t.logits, 2.0) + 0.5 * nn.functional.cross_entropy(
        student_logits, batch.y
    )
    assert torch.allclose(loss, expected, atol=1e-6)


def test_after_step_moves_the_ema_by_exactly_the_decay_formula():
    task = _task(decay=0.9)
    student, teacher = task.flow.student, _ema(task)
    before = copy.deepcopy(teacher.model.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    moved = student.state_dict()
    task.after_step()  # update 1: d = min(0.9, 1 - 1/2) = 0.5
    for k, v in teacher.model.state_dict().items():
        assert torch.allclose(v, 0.5 * before[k] + 0.5 * moved[k], atol=1e-6), k
    for _ in range(20):
        task.after_step()
    assert int(task.module.ema.updates) == 21
    before = copy.deepcopy(teacher.model.state_dict())
    task.after_step()  # update 22: d = min(0.9, 1 - 1/23) = 0.9
    for k, v in teacher.model.state_dict().items():
        assert torch.allclose(v, 0.9 * before[k] + 0.1 * moved[k], atol=1e-6), k
    assert effective_decay(0.9, 1) == 0.5 and effective_decay(0.9, 22) == 0.9
    assert effective_decay(0.99, 1, warmup=False) == 0.99

    flat = _task(decay=0.75, warmup=False)
    student, ema = flat.flow.student, _ema(flat).model
    before = copy.deepcopy(ema.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(2.0)
    flat.after_step()
    for k, v in ema.state_dict().items():
        assert torch.allclose(v, 0.75 * before[k] + 0.25 * student.state_dict()[k], atol=1e-6), k


def test_buffers_are_averaged_and_integer_buffers_copied():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = copy.deepcopy(model)
    model.train()
    model(torch.randn(16, 3))  # running stats move, num_batches_tracked = 1
    ema_update(ema, model, 0.8)
    bn, bn_e = model[1], ema[1]
    assert torch.allclose(bn_e.running_mean, 0.8 * torch.zeros(4) + 0.2 * bn.running_mean)
    assert int(bn_e.num_batches_tracked) == 1


def test_export_choice_and_eval_models():
    task = _task()
    assert list(task.eval_models()) == ["student", "ema"] and task.export_model() is task.flow.student
    assert task.eval_models()["ema"] is _ema(task).model
    as_ema = _task(export="ema")
    assert as_ema.primary == "ema" and list(as_ema.eval_models()) == ["ema", "online"]
    assert as_ema.export_model() is _ema(as_ema).model


def test_bad_params_fail_before_running():
    with pytest.raises(ConfigError, match=r"scheme\.params\.decay"):
        check_config(_cfg(scheme={"params": {"decay": 1.5}}))
    with pytest.raises(ConfigError, match=r"scheme\.params\.export.*student.*ema"):
        check_config(_cfg(scheme={"params": {"export": "teacher"}}))
    with pytest.raises(ConfigError, match=r"scheme\.params\.rampup: unknown parameter"):  # the term's warmup_epochs
        check_config(_cfg(scheme={"params": {"rampup": 5}}))


def test_run_rows_and_the_ema_sees_the_transfer_set(tmp_path):
    res = compare(_cfg(), out=tmp_path / "run", progress=False)
    assert [r["role"] for r in res["rows"]] == ["baseline", "student", "ema"]
    entries = results(tmp_path / "run")
    assert entries["ema-s0"]["transfer"] and entries["ema-s0"]["train_samples"] == 800 + 200
    assert entries["ema-s0:ema"]["member_of"] == "ema-s0"


def test_resume_keeps_the_ema(tmp_path, monkeypatch):
    """A run interrupted mid-epoch and resumed gives exactly the EMA of an uninterrupted run."""
    cfg = _cfg(train={"epochs": 2, "checkpoint_every_steps": 5}, scheme={"params": {"export": "ema"}})
    reference = distill(cfg, out=tmp_path / "ref", progress=False)

    original = FlowTask.training_step
    calls = {"n": 0}

    def crash_at_step_28(self, model, batch, progress, *args):
        calls["n"] += 1
        if calls["n"] == 28:  # epoch 2 (20 steps per epoch), after the checkpoint at step 25
            raise KeyboardInterrupt
        return original(self, model, batch, progress, *args)

    monkeypatch.setattr(FlowTask, "training_step", crash_at_step_28)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, out=tmp_path / "cut", progress=False)
    monkeypatch.setattr(FlowTask, "training_step", original)
    state = safe_load(tmp_path / "cut" / "ema-s0" / "last.pt")
    assert state["step"] == 25 and int(state["module"]["ema.updates"]) == 25  # EMA and its step count are saved
    resumed = distill(cfg, out=tmp_path / "cut", resume=True, progress=False)
    _, wa = load_exported(tmp_path / "ref" / "student.pt")  # export: ema -> the EMA weights
    _, wb = load_exported(tmp_path / "cut" / "student.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert reference["student"]["last_acc"] == resumed["student"]["last_acc"]


@pytest.mark.slow
def test_recipe_runs_end_to_end(tmp_path):
    run = dk(
        "run",
        "ema",
        "data.params.num_samples=1000",
        "data.params.transfer_samples=500",
        "train.epochs=2",
        "seeds=[0]",
        "--out",
        "r",
        "--quiet",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    entries = results(tmp_path / "r")
    assert {"baseline-s0", "ema-s0", "ema-s0:ema"} <= set(entries)
