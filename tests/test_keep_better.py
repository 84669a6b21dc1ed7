"""Keeping the better of the distilled student and the student alone on the validation split
(schemes/keep_better.py): the rule, ``dk.distill``'s default, the offline scheme's ``keep_better``, a
validation split carved from given tensors, and the bench cell's cost."""

import json
import math

import pytest
import torch

import darkknowledge as dk
from darkknowledge import commands
from darkknowledge.bench.cells import Cell, CellTask
from darkknowledge.bench.execute import _result
from darkknowledge.config import load_config
from darkknowledge.data import DataBundle, DatasetInfo, TensorData
from darkknowledge.data.catalog import with_validation
from darkknowledge.errors import ConfigError
from darkknowledge.runs import default_objective
from darkknowledge.schemes.keep_better import kept, selection


def test_the_student_alone_is_kept_only_when_strictly_better() -> None:
    assert kept(80.0, 79.9) == "alone"
    assert kept(80.0, 80.0) == "distilled"  # a tie keeps what was asked for
    assert kept(70.0, 80.0) == "distilled"
    assert kept(None, 80.0) == kept(math.nan, 80.0) == "distilled"  # unmeasured (a dry run)
    choice = selection(
        {"name": "a", "val_acc": 90.0, "train_seconds": 1.5}, {"name": "d", "val_acc": 85.0, "train_seconds": 2.0}
    )
    assert choice == {
        "kept": "alone",
        "val_acc": {"alone": 90.0, "distilled": 85.0},
        "stages": {"alone": "a", "distilled": "d"},
        "train_seconds": 3.5,
    }


def _rule(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # (N,) four classes


class _Wrong(torch.nn.Module):
    """A confident teacher that names the next class: nothing right to transfer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(8.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.nn.functional.one_hot((_rule(x) + 1) % 4, 4).float()


def _data(n: int = 400) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    xt = torch.randn(200, 8, generator=g)
    return (x, _rule(x)), (xt, _rule(xt))


def test_a_teacher_with_nothing_to_give_leaves_the_student_alone(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(default_objective, "MIN_STEPS", 60)
    out = dk.distill("mlp", _Wrong(), _data(), out=tmp_path / "run")
    assert out.kept == "alone" and out.distilled is not None and out.baseline is not None
    assert out.model is out.baseline.model and out.entry is out.baseline.entry  # what is delivered is the student alone
    assert out.accuracy > 50.0 > out.distilled.accuracy  # the copy of a wrong teacher is wrong
    assert out.distilled.entry["losses"] == ["kd"] and out.entry["losses"] == ["ce"]
    assert out.selection["val_acc"]["alone"] > out.selection["val_acc"]["distilled"]
    text = str(out)
    assert "Kept: the student trained alone" in text and "Distillation did not help" in text
    recorded = {m["name"]: m for m in json.loads((tmp_path / "run" / "results.json").read_text())["models"]}
    assert recorded[out.entry["name"]]["selection"] == recorded[out.distilled.entry["name"]]["selection"]
    assert recorded[out.entry["name"]]["selection"]["kept"] == "alone"


def test_the_scheme_delivers_the_kept_student_and_needs_a_validation_split(tmp_path) -> None:
    keys = [
        "data.params.num_samples=600",
        "data.params.transfer_samples=0",
        "train.epochs=2",
        "teacher.train.epochs=2",
        "scheme.params.keep_better=true",
        "profile.enabled=false",
    ]
    with pytest.raises(ConfigError, match="keep_better: .*needs a validation split"):
        commands.distill(load_config("kd", [*keys, "data.val_fraction=0"]), tmp_path / "none", progress=False)
    assert not (tmp_path / "none" / "results.json").exists()  # refused before anything trained
    res = commands.distill(load_config("kd", keys), tmp_path / "run", progress=False)
    first, other = res["entries"][0], res["entries"][1]
    choice = first["selection"]
    assert other["selection"] == choice and {first["name"], other["name"]} == set(choice["stages"].values())
    assert first["name"] == choice["stages"][choice["kept"]]  # the kept student comes first
    assert res["student"] is first and res["model"] is not None
    exported = torch.load(res["exported"], weights_only=False)
    state = exported.get("state_dict") or exported.get("module")
    assert all(torch.equal(v, res["model"].state_dict()[k]) for k, v in state.items())  # the kept one's weights
    assert choice["train_seconds"] == pytest.approx(first["train_seconds"] + other["train_seconds"], abs=1e-2)


def test_given_tensors_get_a_validation_split() -> None:
    out = dk.train("mlp", _data(), epochs=3, config={"data": {"val_fraction": 0.25}})
    assert out.entry["best_selected_on"] == "val" and out.entry["train_samples"] == 300
    assert out.entry["val_acc"] is not None
    (x, y), (xt, yt) = _data()
    info = DatasetInfo(name="mine", num_classes=4, input_shape=(8,), fingerprint="f0")
    bundle = DataBundle(train=TensorData(x, y), test=TensorData(xt, yt), info=info)
    carved = with_validation(bundle, 0.25, 0)
    assert len(carved.train) == 300 and carved.val is not None and len(carved.val) == 100
    assert (
        carved.info.fingerprint != "f0" and with_validation(bundle, 0.25, 1).info.fingerprint != carved.info.fingerprint
    )
    with pytest.raises(ConfigError, match="already has a validation split"):
        with_validation(carved, 0.1, 0)
    with pytest.raises(ConfigError, match="holdout"):  # still a named dataset's setting only
        dk.train("mlp", _data(), epochs=1, config={"data": {"holdout": "val", "val_fraction": 0.2}})


def test_a_bench_cell_costs_both_students() -> None:
    cell = Cell("p", "function_matching", 0)
    task = CellTask(cell, "s", {}, "k", "/tmp/w", "/tmp/r.json", {}, False, None)
    choice = {"kept": "distilled", "train_seconds": 7.0}
    res = _result(task, [{"name": "kd-s0", "last_acc": 90.0, "train_seconds": 4.0, "selection": choice}], None)
    assert res["train_seconds"] == 7.0 and res["kept"] == "distilled"


def test_the_api_refuses_a_choice_without_a_validation_split() -> None:
    asked = {"scheme": {"params": {"keep_better": True}}}
    with pytest.raises(ConfigError, match="keep_better: .*needs a validation split"):
        dk.distill("mlp", _Wrong(), _data(), {"kd": {}}, epochs=1, config=asked)
    word = {"scheme": {"params": {"keep_better": "yes"}}}
    with pytest.raises(ConfigError, match="keep_better"):  # a bool, not a string
        dk.distill("mlp", _Wrong(), _data(), {"kd": {}}, epochs=1, config=word)
