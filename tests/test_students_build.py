"""Students derived in the config (``from: teacher``, width/depth, ops, quantize) through a real run:
built, trained, profiled in the results, exported and rebuilt by `dk eval` / `dk export`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from darkknowledge import commands
from darkknowledge.config import deep_merge, load_config
from darkknowledge.data import load_dataset
from darkknowledge.errors import ConfigError
from darkknowledge.runs.build import build_model, model_spec
from helpers import TINY, dk, results

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**changes):
    """TINY with ``changes`` merged in; a given ``student`` section replaces TINY's."""
    raw = deep_merge({k: v for k, v in TINY.items() if k != "student" or "student" not in changes}, changes)
    return load_config(raw)


def test_student_from_teacher_takes_the_teachers_family_and_params():
    cfg = _cfg(student={"from": "teacher", "width": 0.5, "depth": 0.5})
    assert (cfg.student.name, cfg.student.params) == ("cnn1d", {"channels": 16})
    assert (cfg.student.width, cfg.student.depth) == (0.5, 0.5)


@pytest.mark.parametrize(
    ("student", "message"),
    [
        ({"from": "assistant"}, "student.from: 'assistant' is not a model to derive from; valid: 'teacher'"),
        ({"from": "teacher", "name": "mlp"}, "give `from: teacher` or `name: mlp`, not both"),
        ({"from": "teacher", "width": 0}, "student.width"),
        ({"from": "teacher", "ops": "winograd"}, "student.ops"),
    ],
)
def test_bad_derived_student_is_one_clear_error(student, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _cfg(student=student)


def test_from_teacher_without_a_teacher_is_refused():
    raw = {k: v for k, v in TINY.items() if k != "teacher"}
    with pytest.raises(ConfigError, match="needs a `teacher:` section"):
        load_config({**raw, "student": {"from": "teacher"}})


def test_bad_quantize_spec_fails_in_the_config_check_before_anything_is_built():
    from darkknowledge.runs.build import check_config

    cfg = _cfg(student={"name": "cnn1d", "quantize": {"bits": 4, "bitz": 2}})
    with pytest.raises(ConfigError, match="student.quantize"):
        check_config(cfg)


def test_shrunk_depthwise_quantized_student_builds_and_its_spec_rebuilds_it():
    cfg = _cfg(student={"from": "teacher", "width": 0.5, "ops": "depthwise", "quantize": {"bits": 4, "act_bits": 8}})
    info = load_dataset("mnist1d", num_samples=200, transfer_samples=0).info
    torch.manual_seed(0)
    model = build_model(cfg.student, info)
    teacher = build_model(cfg.teacher, info, "teacher")
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in teacher.parameters()) / 3
    spec = model_spec(model)
    assert spec["ops"] == "depthwise" and spec["quantize"]["bits"] == 4
    from darkknowledge.config import ModelConfig

    again = build_model(ModelConfig(**spec), info)
    again.load_state_dict(model.state_dict())
    x = torch.randn(4, *info.input_shape)
    model.eval(), again.eval()
    assert torch.equal(model(x), again(x))


def test_teacher_key_is_unchanged_by_the_new_default_fields(tmp_path):
    """A teacher cached before width/depth/ops/quantize existed keeps its key."""
    from darkknowledge.runs.session import Session

    with Session(_cfg(), None) as s:
        dumped = s.cfg.teacher.model_dump(mode="json")
        assert "quantize" in dumped  # the fields exist ...
        key = s.teacher_key()
    with Session(_cfg(teacher={"width": 1.0, "ops": "plain"}), None) as s:
        assert s.teacher_key() == key  # ... and at their defaults they do not enter the key
    with Session(_cfg(teacher={"quantize": {"bits": 8}}), None) as s:
        assert s.teacher_key() != key


@pytest.mark.slow
def test_quantized_student_run_reports_profiles_and_exports(tmp_path):
    raw = deep_merge(
        {k: v for k, v in TINY.items() if k != "student"},
        {
            "seeds": [0],
            "train": {"epochs": 2},
            "teacher": {"train": {"epochs": 2}},
            "student": {"from": "teacher", "width": 0.5, "quantize": {"bits": 4, "act_bits": 4}},
        },
    )
    recipe = tmp_path / "q.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    proc = dk("run", str(recipe), "--out", "run", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    entries = results(tmp_path / "run")
    student, teacher = next(e for e in entries.values() if e["role"] == "student"), entries["teacher"]
    for e in (student, teacher):
        prof = e["profile"]
        assert prof["params"] == e["params"] and prof["flops"] > 0 and prof["latency_ms_b1"] > 0
    assert student["profile"]["quant_bits"] == 4 and teacher["profile"]["quant_bits"] is None
    assert student["profile"]["size_quant_bytes"] < student["profile"]["size_fp32_bytes"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Student report" in report and "compression" in report.lower()
    proc = dk("export", "run", "--out", "exported", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    spec = json.loads((tmp_path / "exported" / "model.json").read_text())
    assert spec["spec"]["quantize"]["bits"] == 4 and spec["spec"]["name"] == "cnn1d"
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert (tmp_path / "exported" / "model.onnx").is_file()
    stage = student["name"]
    res = commands.evaluate_checkpoint(tmp_path / "run" / stage / "model.pt")
    assert res["top1"] == pytest.approx(student["last_acc"], abs=1e-6)


def test_a_float_checkpoint_starts_a_quantized_student(tmp_path):
    """QAT from trained weights: the float file loads first, then the layers are quantized."""
    from darkknowledge.config import ModelConfig
    from darkknowledge.engine.checkpoint import export_model
    from darkknowledge.students.quant import is_quantized

    info = load_dataset("mnist1d", num_samples=200, transfer_samples=0).info
    torch.manual_seed(3)
    trained = build_model(ModelConfig(name="cnn1d", params={"channels": 8}), info)
    path = export_model(trained, tmp_path / "float.pt", model_spec(trained))
    quantized = build_model(
        ModelConfig(name="cnn1d", params={"channels": 8}, checkpoint=str(path), quantize={"bits": 8}), info
    )
    assert is_quantized(quantized) and model_spec(quantized)["quantize"]["bits"] == 8
    for key, value in trained.state_dict().items():
        assert torch.equal(quantized.state_dict()[key], value), key  # the float weights, as trained
    x = torch.randn(8, *info.input_shape)
    trained.eval(), quantized.eval()
    assert torch.allclose(quantized(x), trained(x), atol=0.15 * trained(x).abs().max().item())  # 8 bits: close
