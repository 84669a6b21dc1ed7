import numpy as np
import pytest
import torch

from darkknowledge.engine.checkpoint import (
    atomic_save,
    capture_rng,
    export_model,
    load_exported,
    restore_rng,
    safe_load,
    state_hash,
)
from darkknowledge.errors import CheckpointError
from darkknowledge.models import create_model


def test_atomic_save_round_trip_weights_only(tmp_path):
    model = create_model("cnn2d", num_classes=3, input_shape=(1, 8, 8))
    path = atomic_save(
        {"module": model.state_dict(), "epoch": 3, "history": [{"top1": 1.5}], "rng": capture_rng()},
        tmp_path / "ck" / "last.pt",
    )
    state = safe_load(path)  # weights_only=True inside
    assert state["epoch"] == 3 and state["history"][0]["top1"] == 1.5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state["module"].items())
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind


def test_failed_save_keeps_old_file(tmp_path):
    path = atomic_save({"v": 1}, tmp_path / "last.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"v": Unpicklable()}, path)
    assert safe_load(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_code_is_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        safe_load(path)


def test_rng_round_trip():
    state = capture_rng()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    restore_rng(state)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_state_hash_sees_any_weight_change():
    model = create_model("mlp", num_classes=3, input_shape=(4,))
    h = state_hash(model)
    assert h == state_hash(model.state_dict())
    with torch.no_grad():
        model.fc.bias[0] += 1e-6
    assert state_hash(model) != h


def test_export_rebuilds_the_student_alone(tmp_path):
    model = create_model("mlp", num_classes=3, input_shape=(4,), hidden=(7,))
    export_model(model, tmp_path / "student.pt", {"name": model.dk_name, "params": model.dk_params})
    spec, state = load_exported(tmp_path / "student.pt")
    clone = create_model(spec["name"], **spec["params"])
    clone.load_state_dict(state)
    x = torch.randn(2, 4)
    assert torch.equal(clone(x), model(x))
    atomic_save({"kind": "train"}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="not an exported model"):
        load_exported(tmp_path / "last.pt")
