"""Residual KD (`residual`): the assistant learns the detached teacher-student residual; S + A is deployed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from darkknowledge.config import ModelConfig
from darkknowledge.data.batch import Batch
from darkknowledge.engine.checkpoint import export_model, load_exported
from darkknowledge.errors import ShapeError
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.models import count_params, create_model
from darkknowledge.runs.build import build_objective
from darkknowledge.schemes.residual import FEATURE, mimic_objective, residual_task
from darkknowledge.schemes.task import FlowTask
from darkknowledge.teachers.base import Teacher
from darkknowledge.teachers.residual import ResidualTarget
from helpers import ONE_THREAD, dk, results, torchrun, write_recipe


def _scheme(beta=1.0, gamma=1.0, pair_ce=0.0, losses=None) -> tuple[FlowTask, nn.Module, nn.Module, Batch]:
    torch.manual_seed(0)
    teacher = create_model("cnn1d", channels=4)  # feature (B, 4 * 10)
    student = create_model("mlp", hidden=[12])
    assistant = ModelConfig(name="mlp", params={"hidden": [8]}).model_dump(include={"name", "params"})
    objective = build_objective(losses or {"kd": {"T": 4.0, "alpha": 0.9}})
    task = residual_task(teacher, student, assistant, objective, beta=beta, gamma=gamma, pair_ce=pair_ce, seed=0)
    batch = Batch(torch.randn(6, 40), torch.tensor([0, 1, 2, 3, -1, -1]), torch.arange(6))
    task.setup(batch)
    return task, teacher, student, batch


def _grads(module):
    return {n: (p.grad.abs().sum().item() if p.grad is not None else None) for n, p in module.named_parameters()}


class _FixedFeature(Teacher):
    """A frozen teacher stand-in whose feature at ``fc:input`` is ``f_t``."""

    standalone = True

    def __init__(self, f_t: torch.Tensor) -> None:
        super().__init__()
        self.f_t, self.model = f_t, nn.ModuleDict({"fc": nn.Identity()})

    def __call__(self, batch, views=None) -> Outputs:
        return Outputs(logits=None, features={FEATURE: self.f_t})


def residual_terms(f_s: torch.Tensor, f_a: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair's two terms on given features, as the plan wires them: ``mimic`` (fitnet without
    regressor, connector vs the teacher's feature) and ``residual`` (fitnet without regressor,
    assistant vs the :class:`ResidualTarget` ``sg(F_T - F_S)``)."""
    teacher = _FixedFeature(f_t)
    target = ResidualTarget(teacher, "pair", "connector", FEATURE)  # type: ignore[arg-type]
    pair = nn.ModuleDict({"connector": nn.Identity(), "assistant": nn.Identity()})
    batch = Batch(torch.zeros(len(f_s), 1), torch.zeros(len(f_s), dtype=torch.long), torch.arange(len(f_s)))
    view = Outputs(logits=None, features={"connector": f_s, "assistant": f_a})
    info = SetupInfo(num_samples=len(f_s), batch_size=len(f_s))
    out = []
    for objective, source in (
        (mimic_objective("mimic", "connector", 1.0), teacher),
        (mimic_objective("residual", "assistant", 1.0), target),
    ):
        objective.bind(pair, teacher.model)
        given = source(batch, {"pair": view})
        objective.setup(view, given, info)
        out.append(objective(view, given, batch)[0])
    return out[0], out[1]


def test_mimic_trains_the_student_and_residual_trains_the_assistant_only():
    f_s = torch.randn(5, 7, requires_grad=True)
    f_a = torch.randn(5, 7, requires_grad=True)
    f_t = torch.randn(5, 7)
    mimic, residual = residual_terms(f_s, f_a, f_t)
    residual.backward()
    assert f_s.grad is None and f_a.grad is not None  # the residual target is detached
    assert torch.allclose(f_a.grad, 2 * (f_a - (f_t - f_s)).detach() / f_a.numel())
    mimic.backward()
    assert f_s.grad is not None
    assert torch.allclose(f_s.grad, 2 * (f_s - f_t).detach() / f_s.numel())


def test_a_perfect_assistant_has_zero_residual_loss():
    f_s, f_t = torch.randn(3, 4), torch.randn(3, 4)
    _, residual = residual_terms(f_s, f_t - f_s, f_t)
    assert residual.item() == pytest.approx(0.0, abs=1e-12)


def test_mismatched_features_are_a_shape_error():
    with pytest.raises(ShapeError, match="needs equal shapes"):  # assistant vs teacher feature
        residual_terms(torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 3))
    with pytest.raises(ShapeError, match="equal shapes|differ in shape"):  # student vs teacher feature
        residual_terms(torch.randn(2, 4), torch.randn(2, 3), torch.randn(2, 3))


def test_pair_inference_is_the_teacher_classifier_of_student_plus_assistant():
    scheme, teacher, student, batch = _scheme()
    pair = scheme.export_model()
    assert torch.equal(pair.fc.weight, teacher.fc.weight) and not pair.fc.weight.requires_grad
    trunk = {k: v for k, v in student.state_dict().items() if not k.startswith("fc.")}
    assert pair.student.state_dict().keys() == trunk.keys()  # the pair holds the trunk, not the student's head
    assert all(torch.equal(pair.student.state_dict()[k], v) for k, v in trunk.items())
    x = batch.x
    hidden = student.blocks(student.flatten(x))  # the student's penultimate feature
    expected = teacher.fc(pair.connector(hidden) + pair.assistant(x))
    assert torch.allclose(pair(x), expected, atol=1e-6)
    assert torch.allclose(scheme.eval_models()["without_assistant"](x), teacher.fc(pair.connector(hidden)), atol=1e-6)
    assert torch.equal(scheme.eval_models()["student_alone"](x), student(x))


def test_one_step_gradients_follow_the_paper():
    scheme, teacher, _, batch = _scheme()
    module = scheme.module
    assert module is scheme.flow
    loss, terms = scheme.training_step(module, batch, 0.0)
    assert set(terms) == {"kd", "mimic", "residual"}
    loss.backward()
    g = _grads(module)
    assert g["pair.fc.weight"] is None  # the teacher's classifier stays frozen
    assert (
        g["pair.assistant.fc.weight"] > 0
        and g["pair.connector.weight"] > 0
        and g["head.weight"] > 0
        and g["pair.student.blocks.0.0.weight"] > 0
    )
    assert all(p.grad is None for p in teacher.parameters())
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len({id(p) for p in trainable}) == len(trainable)  # the evaluation view adds no duplicate
    assert all(p.grad is not None for p in trainable)  # every trainable parameter is used (DDP)


def test_the_assistant_gets_no_gradient_without_its_loss_and_pushes_nothing_back():
    scheme, _, _, batch = _scheme(gamma=0.0)
    scheme.training_step(scheme.module, batch, 0.0)[0].backward()
    assert _grads(scheme.module)["pair.assistant.fc.weight"] == 0.0
    # with only the residual loss, the student side gets nothing: the target is detached
    scheme, _, _, batch = _scheme(beta=0.0, losses={"ce": {}})
    flow = scheme.flow
    [residual] = [link for link in flow.links if isinstance(link.teacher, ResidualTarget)]
    loss, terms = residual(flow.compute_views(batch), batch, 0.0)
    assert set(terms) == {"residual"}
    loss.backward()
    g = _grads(flow)
    assert g["pair.connector.weight"] is None and g["head.weight"] is None
    assert g["pair.student.blocks.0.0.weight"] is None
    assert g["pair.assistant.fc.weight"] > 0


def test_pair_ce_adds_a_label_term():
    scheme, _, _, batch = _scheme(pair_ce=0.5)
    _, terms = scheme.training_step(scheme.module, batch, 0.0)
    assert "pair_ce" in terms and "pair_ce" in scheme.describe()["losses"]


def test_export_reloads_as_a_zoo_model(tmp_path):
    scheme, _, _, batch = _scheme()
    pair = scheme.export_model()
    path = export_model(pair, tmp_path / "model.pt", {"name": pair.dk_name, "params": pair.dk_params}, {})
    spec, state = load_exported(path)
    assert spec["name"] == "residual_pair"
    again = create_model(spec["name"], **spec["params"])
    again.load_state_dict(state)
    assert torch.equal(again(batch.x), pair(batch.x))
    assert count_params(again) == count_params(pair) > count_params(scheme.eval_models()["student_alone"])


def test_teacher_without_linear_fc_is_refused():
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 10))
    with pytest.raises(ShapeError, match="no Linear `fc`"):
        residual_task(teacher, create_model("mlp", hidden=[8]), {"name": "mlp"}, build_objective({"ce": {}}))


@pytest.mark.slow
def test_residual_distill_and_eval_end_to_end(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        seeds=[0],
        scheme={"name": "residual", "params": {"assistant": {"name": "mlp", "params": {"hidden": [16]}}}},
    )
    run = dk("distill", str(recipe), "--out", "out", "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    res = results(tmp_path / "out")
    assert res["residual-s0"]["model"] == "residual_pair" and res["residual-s0"]["role"] == "student"
    assert res["residual-s0:student_alone"]["model"] == "mlp"
    assert res["residual-s0"]["params"] > res["residual-s0:student_alone"]["params"]
    ev = dk("eval", str(tmp_path / "out" / "student.pt"), cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert f'"top1": {res["residual-s0"]["last_acc"]}' in ev.stdout  # the rebuilt pair scores the same


@pytest.mark.slow
def test_residual_under_two_process_ddp(tmp_path):
    """Every trainable parameter (student, connector, assistant) is used in each step: DDP runs without
    find_unused_parameters and the two ranks end with the pair one process would train."""

    recipe = write_recipe(
        tmp_path / "r.yaml",
        seeds=[0],
        train={"epochs": 2},
        scheme={"name": "residual", "params": {"assistant": {"name": "mlp", "params": {"hidden": [16]}}}},
    )
    made = dk("train", str(recipe), "--model", "teacher", "--out", "t", "--quiet", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    teacher = f"teacher.checkpoint={tmp_path / 't' / 'teacher.pt'}"  # one teacher for both runs
    single = dk("distill", str(recipe), teacher, "--out", "single", "--quiet", cwd=tmp_path, env=ONE_THREAD)
    assert single.returncode == 0, single.stderr
    ddp = torchrun("distill", str(recipe), teacher, "--out", "ddp", "--quiet", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    _, wa = load_exported(tmp_path / "single" / "student.pt")
    _, wb = load_exported(tmp_path / "ddp" / "student.pt")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4), k
