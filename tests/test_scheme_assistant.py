"""TAKD (`assistant`): the teacher teaches the assistant, the assistant teaches the student."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from darkknowledge.config import ModelConfig, deep_merge, load_config
from darkknowledge.data import DatasetInfo
from darkknowledge.engine.checkpoint import load_exported, safe_load, state_hash
from darkknowledge.engine.task import Task
from darkknowledge.errors import ConfigError
from darkknowledge.models import count_params, create_model
from darkknowledge.runs.context import RunContext
from darkknowledge.schemes import resolve_scheme
from darkknowledge.schemes.assistant import TeacherAssistant, check_sizes, interpolate, interpolate_assistants
from helpers import TINY, dk, results, write_recipe

M = ModelConfig


def _params(spec: ModelConfig) -> int:
    shape = (40,) if spec.name in ("mlp", "cnn1d") else (3, 32, 32)
    return count_params(create_model(spec.name, num_classes=10, input_shape=shape, **spec.params))


class StubContext(RunContext):
    """A run context without data: the given pre-trained teacher, and ``train`` records who taught
    whom (each stage's task, built when its stage starts) and nudges the trained weights."""

    def __init__(self, teacher: torch.nn.Module, student_spec: ModelConfig, losses: dict) -> None:
        cfg = load_config(
            deep_merge(
                TINY,
                {
                    "student": student_spec.model_dump(exclude={"checkpoint"}),
                    "losses": losses,
                    "scheme": {"name": "assistant"},
                },
            )
        )
        session = SimpleNamespace(cfg=cfg, bundle=SimpleNamespace(info=DatasetInfo("mnist1d", 10, (40,))))
        super().__init__(session, cfg)  # type: ignore[arg-type]
        self._teacher = teacher
        self.trained: list[dict] = []

    def teacher(self) -> torch.nn.Module:
        return self._teacher

    def train(self, stage, task: Task, seed, role="student", train_cfg=None, with_transfer=False, label=None):
        student = task.eval_models()["student"]
        [teacher] = task.teachers  # an offline stage: one frozen teacher
        self.trained.append(
            {
                "stage": stage,
                "role": role,
                "model": student,
                "teacher": teacher.model,
                "teacher_hash": task.fingerprint(),
                "transfer": with_transfer,
            }
        )
        with torch.no_grad():  # "training": the weights change, so a teacher hashed too early would differ
            for p in student.parameters():
                p.add_(0.01)
        self.exports[stage] = task.export_model()
        return [{"name": stage, "role": role}]


def test_interpolate_geometric_and_linear():
    assert interpolate(4, 64, 0.5) == pytest.approx(16)
    assert interpolate(4, 64, 0.5, "linear") == pytest.approx(34)


@pytest.mark.parametrize(
    "teacher,student,num",
    [
        (M(name="mlp", params={"hidden": [400, 400, 400]}), M(name="mlp", params={"hidden": [32]}), 2),
        (M(name="cnn1d", params={"channels": 64, "depth": 3}), M(name="cnn1d", params={"channels": 4, "depth": 2}), 1),
        (M(name="cnn1d", params={"channels": 64}), M(name="cnn1d", params={"channels": 8}), 3),
        (M(name="resnet110"), M(name="resnet8"), 2),
        (M(name="wrn_40_2"), M(name="wrn_16_1"), 1),
    ],
)
def test_automatic_assistants_are_strictly_between_and_shrink(teacher, student, num):
    specs = interpolate_assistants(teacher, student, num)
    assert len(specs) == num
    sizes = [_params(teacher), *[_params(s) for s in specs], _params(student)]
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes


def test_mlp_interpolation_is_geometric_in_width_and_linear_in_depth():
    [ta] = interpolate_assistants(
        M(name="mlp", params={"hidden": [256, 256, 256]}), M(name="mlp", params={"hidden": [16]}), 1
    )
    assert ta.params["hidden"] == [64, 64]  # sqrt(16 * 256) = 64 wide, (1 + 3) / 2 = 2 deep


def test_resnet_depths_snap_to_the_zoo():
    assert [s.name for s in interpolate_assistants(M(name="resnet56"), M(name="resnet8"), 2)] == [
        "resnet44",
        "resnet20",
    ]  # targets 40 and 24


def test_different_families_ask_for_explicit_assistants():
    with pytest.raises(ConfigError, match=r"not of one interpolable family.*assistants"):
        interpolate_assistants(M(name="cnn1d"), M(name="mlp"), 1)


def test_no_room_between_neighbouring_depths():
    with pytest.raises(ConfigError, match=r"strictly between 8 and 14"):
        interpolate_assistants(M(name="resnet14"), M(name="resnet8"), 1)


def test_a_chain_that_does_not_shrink_is_refused():
    with pytest.raises(ConfigError, match=r"must shrink.*assistant1 \(50\)"):
        check_sizes([("teacher", 100), ("assistant1", 50), ("student", 60)])


def test_params_are_validated_with_their_path():
    with pytest.raises(ConfigError, match=r"scheme\.params\.num_assistants"):
        resolve_scheme("assistant", {"num_assistants": 0})
    with pytest.raises(ConfigError, match=r"scheme\.params\.assistants\.0"):
        resolve_scheme("assistant", {"assistants": [{"nme": "mlp"}]})


def test_teacher_teaches_assistant_and_assistant_teaches_student():
    torch.manual_seed(0)
    teacher = create_model("mlp", hidden=[128, 128])
    ctx = StubContext(teacher, M(name="mlp", params={"hidden": [8]}), {"kd": {"T": 4.0, "alpha": 0.9}})
    TeacherAssistant.run(ctx, 0, TeacherAssistant.Params(num_assistants=2, plain_kd=True))
    ta1, ta2, student, direct = ctx.trained
    assert [t["role"] for t in ctx.trained] == ["assistant1", "assistant2", "student", "direct_kd"]
    assert ta1["teacher"] is teacher and ta2["teacher"] is ta1["model"] and student["teacher"] is ta2["model"]
    assert direct["teacher"] is teacher and direct["model"] is not student["model"]
    # the hash a pupil records is that of its teacher's *trained* weights
    assert student["teacher_hash"] == state_hash(ta2["model"]) != ta1["teacher_hash"]
    assert all(t["transfer"] for t in ctx.trained)
    assert [count_params(t["model"]) for t in (ta1, ta2)] == sorted(
        [count_params(t["model"]) for t in (ta1, ta2)], reverse=True
    )


@pytest.mark.slow
def test_takd_run_end_to_end_records_the_chain(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        seeds=[0],
        scheme={
            "name": "assistant",
            "params": {"assistants": [{"name": "mlp", "params": {"hidden": [48]}}], "plain_kd": True},
        },
    )
    run = dk("run", str(recipe), "--out", "out", "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "out"
    res = results(out)
    assert res["assistant-s0"]["role"] == "student" and res["assistant-ta1-s0"]["role"] == "assistant1"
    assert res["assistant-kd-s0"]["role"] == "direct_kd"
    report = (out / "report.md").read_text()
    assert "assistant1" in report and "direct_kd" in report
    spec, state = load_exported(out / "assistant-ta1-s0" / "model.pt")
    ta = create_model(spec["name"], **spec["params"])
    ta.load_state_dict(state)
    assert safe_load(out / "assistant-s0" / "last.pt")["teacher_hash"] == state_hash(ta)
    teacher_hash = safe_load(out / "assistant-kd-s0" / "last.pt")["teacher_hash"]
    assert safe_load(out / "assistant-ta1-s0" / "last.pt")["teacher_hash"] == teacher_hash != state_hash(ta)
