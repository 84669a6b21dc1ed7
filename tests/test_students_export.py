"""Student export (darkknowledge.students.export): safetensors, ONNX, torch.export, model.json."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

from darkknowledge.errors import CheckpointError, ConfigError, ShapeError
from darkknowledge.models import create_model
from darkknowledge.students.export import (
    FORMATS,
    export_student,
    load_student_weights,
    one_line,
)


class DataDependent(nn.Module):
    """A branch on a tensor's value: torch.export refuses it, the ONNX tracer freezes it (with a warning)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def _zoo(name: str) -> tuple[nn.Module, dict, torch.Tensor]:
    torch.manual_seed(0)
    params = {"hidden": [16, 16]} if name == "mlp" else {"channels": 8, "depth": 2}
    model = create_model(name, **params)
    return model, {"name": name, "params": params}, torch.randn(3, 40)


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
def test_onnx_and_torch_export_of_zoo_models_match_torch_on_another_batch_size(tmp_path, name):
    ort = pytest.importorskip("onnxruntime")
    model, spec, x = _zoo(name)
    results = export_student(model, spec, tmp_path, x)
    assert set(results) == set(FORMATS) and all(r["ok"] for r in results.values()), results
    assert results["onnx"]["within_tol"] and results["onnx"]["max_abs_diff"] < 1e-4
    assert results["onnx"]["exporter"] == "torchscript" and isinstance(results["onnx"]["opset"], int)

    other = torch.randn(5, 40)  # not the traced batch: the batch axis is dynamic in both files
    with torch.no_grad():
        want = model.eval()(other)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    assert got.shape == (5, 10)
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4)

    program = torch.export.load(tmp_path / "model.pt2")
    assert torch.allclose(program.module()(other), want, atol=1e-5)
    assert results["torch_export"]["dynamic_batch"] is True and results["torch_export"]["max_abs_diff"] < 1e-5


def test_safetensors_round_trip_and_manifest(tmp_path):
    model, spec, x = _zoo("mlp")
    results = export_student(model, spec, tmp_path, x, formats=["safetensors"])
    assert list(results) == ["safetensors"] and results["safetensors"]["ok"]
    assert not (tmp_path / "model.onnx").exists()

    torch.manual_seed(1)
    fresh = create_model("mlp", **spec["params"])
    assert not torch.equal(fresh.fc.weight, model.fc.weight)
    assert load_student_weights(fresh, tmp_path / "model.safetensors") is fresh
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))

    manifest = json.loads((tmp_path / "model.json").read_text())
    assert manifest["spec"] == spec and manifest["kind"] == "student"
    assert manifest["input"] == {"shape": [40], "example_shape": [3, 40], "dtype": "float32"}
    assert manifest["torch"] == torch.__version__
    assert manifest["exports"]["safetensors"]["path"] == "model.safetensors"


def test_weights_that_do_not_fit_raise_one_clear_error(tmp_path):
    model, spec, x = _zoo("mlp")
    export_student(model, spec, tmp_path, x, formats=("safetensors",))
    wider = create_model("mlp", hidden=[32, 16])
    with pytest.raises(CheckpointError, match=r"blocks\.0\.0\.weight is \(16, 40\) in the file but \(32, 40\)"):
        load_student_weights(wider, tmp_path / "model.safetensors")
    deeper = create_model("mlp", hidden=[16, 16, 16])
    with pytest.raises(CheckpointError, match=r"missing from the file: blocks\.2\.0\.weight"):
        load_student_weights(deeper, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not exist"):
        load_student_weights(model, tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_student_weights(model, tmp_path / "junk.safetensors")


def test_a_format_the_model_does_not_allow_is_recorded_and_the_others_are_written(tmp_path):
    torch.manual_seed(0)
    model = DataDependent()
    results = export_student(model, {"name": "custom", "params": {}}, tmp_path, torch.randn(2, 4))
    failed = results["torch_export"]
    assert failed["ok"] is False and "\n" not in failed["reason"] and failed["reason"]
    assert not (tmp_path / "model.pt2").exists()
    assert results["safetensors"]["ok"] and (tmp_path / "model.safetensors").is_file()
    assert results["onnx"]["ok"] and (tmp_path / "model.onnx").is_file()
    assert any("Python boolean" in w for w in results["onnx"]["warnings"])  # the frozen branch is reported
    manifest = json.loads((tmp_path / "model.json").read_text())
    assert manifest["exports"]["torch_export"]["reason"] == failed["reason"]


def test_the_dynamo_exporter_is_used_when_the_legacy_one_fails(tmp_path, monkeypatch):
    real = torch.onnx.export

    def legacy_fails(*args, dynamo=True, **kwargs):
        if not dynamo:
            raise RuntimeError("no symbolic for this op\nmore detail")
        return real(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", legacy_fails)
    model, spec, x = _zoo("mlp")
    result = export_student(model, spec, tmp_path, x[:1], formats=["onnx"])["onnx"]
    assert result["ok"] and result["exporter"] == "dynamo"
    assert result["legacy_reason"] == "RuntimeError: no symbolic for this op"
    if importlib.util.find_spec("onnxruntime") is not None:
        assert result["max_abs_diff"] < 1e-4 and result["within_tol"]


def test_without_onnxruntime_the_check_is_skipped_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    model, spec, x = _zoo("mlp")
    result = export_student(model, spec, tmp_path, x, formats=["onnx"])["onnx"]
    assert result["ok"] and "onnxruntime is not installed" in result["check"] and "max_abs_diff" not in result


def test_a_wrong_output_is_flagged(tmp_path, monkeypatch):
    """The tolerance flag can fail: an ONNX file of another model differs from the torch logits."""
    pytest.importorskip("onnxruntime")
    model, spec, x = _zoo("mlp")
    other, _, _ = _zoo("mlp")
    with torch.no_grad():
        other.fc.bias += 1.0
    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda net, *a, **k: real(other.eval(), *a, **k))
    result = export_student(model, spec, tmp_path, x, formats=["onnx"])["onnx"]
    assert result["max_abs_diff"] == pytest.approx(1.0, abs=1e-4) and result["within_tol"] is False


def test_export_leaves_the_model_in_its_modes(tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp", hidden=[8], dropout=0.5).train()
    model.blocks.eval()
    export_student(
        model,
        {"name": "mlp", "params": {"hidden": [8], "dropout": 0.5}},
        tmp_path,
        torch.randn(2, 40),
        formats=["safetensors", "onnx"],
    )
    assert model.training and model.fc.training and not model.blocks.training and not model.blocks[0].training


def test_bad_arguments_raise_clear_errors(tmp_path):
    model, spec, x = _zoo("mlp")
    with pytest.raises(ConfigError, match=r"unknown \['tflite'\]; valid formats: safetensors, onnx, torch_export"):
        export_student(model, spec, tmp_path, x, formats=["onnx", "tflite"])
    with pytest.raises(ConfigError, match="model 'name'"):
        export_student(model, {"params": {}}, tmp_path, x)
    with pytest.raises(ConfigError, match="cannot be written as JSON"):
        export_student(model, {"name": "mlp", "params": {"f": object()}}, tmp_path, x)
    with pytest.raises(ShapeError, match=r"got \(\)"):
        export_student(model, spec, tmp_path, torch.tensor(1.0))
    assert not any(tmp_path.iterdir())


def test_one_line_keeps_the_first_line():
    assert one_line(ValueError("\n  first\nsecond")) == "ValueError: first"
    assert one_line(KeyError()) == "KeyError"
