"""Honest defaults: `dk train --model teacher` trains what it is told, and the Python API
takes a dataset name and gives the user's teacher back as it came."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

import darkknowledge as dk
from darkknowledge.cli import main
from darkknowledge.engine.checkpoint import load_exported
from darkknowledge.errors import ConfigError, DarkKnowledgeError
from helpers import write_recipe

SMALL = ["data.params.num_samples=600", "data.batch_size=100"]


def _train_teacher(tmp_path, out: str, *args: str) -> dict:
    code = main(
        [
            "train",
            str(tmp_path / "r.yaml"),
            "--model",
            "teacher",
            *SMALL,
            *args,
            "--out",
            str(tmp_path / out),
            "--quiet",
        ]
    )
    assert code == 0
    (entry,) = json.loads((tmp_path / out / "results.json").read_text())["models"]
    return entry


def test_train_overrides_reach_the_teacher_it_trains_with_its_own_seed(tmp_path):
    write_recipe(tmp_path / "r.yaml", teacher={"seed": 7})  # the teacher's own train section says 3 epochs
    entry = _train_teacher(tmp_path, "a", "train.epochs=1")
    assert entry["role"] == "teacher" and entry["model"] == "cnn1d"
    assert entry["epochs"] == 1 and entry["steps"] == 5  # 480 training samples / 100 per batch, once
    assert entry["seed"] == 7 and entry["name"] == "teacher-ce-s7"
    recorded = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert recorded["teacher"]["train"]["epochs"] == 1  # config.yaml says what trained
    assert recorded["teacher"]["train"]["optimizer"]["lr"] == 0.01  # the rest of teacher.train still applies

    again = _train_teacher(tmp_path, "b", "train.epochs=1", "teacher.seed=8")
    assert again["seed"] == 8
    _, wa = load_exported(tmp_path / "a" / "teacher.pt")
    _, wb = load_exported(tmp_path / "b" / "teacher.pt")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # another teacher.seed, another teacher


def test_the_student_keeps_the_recipe_seed_and_the_teacher_takes_seed_overrides(tmp_path):
    write_recipe(tmp_path / "r.yaml", seed=3, teacher={"seed": 7}, train={"epochs": 1})
    code = main(["train", str(tmp_path / "r.yaml"), *SMALL, "--out", str(tmp_path / "s"), "--quiet"])
    assert code == 0
    (student,) = json.loads((tmp_path / "s" / "results.json").read_text())["models"]
    assert (student["role"], student["seed"], student["model"]) == ("baseline", 3, "mlp")

    teacher = _train_teacher(tmp_path, "t", "seed=5", "train.epochs=1")
    assert teacher["seed"] == 5  # `seed=` is about the model being trained
    assert yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())["teacher"]["seed"] == 5


def test_train_teacher_without_a_teacher_or_with_a_checkpoint_is_one_error(tmp_path, capsys):
    write_recipe(tmp_path / "r.yaml", teacher=None)
    assert main(["train", str(tmp_path / "r.yaml"), "--model", "teacher", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dk: error: --model teacher: recipe 'tiny' has no `teacher:` section") and "\n" == err[-1]
    write_recipe(tmp_path / "r.yaml", teacher={"checkpoint": "t.pt"})
    assert main(["train", str(tmp_path / "r.yaml"), "--model", "teacher", "--out", str(tmp_path / "x")]) == 2
    assert "teacher.checkpoint is set ('t.pt')" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- the Python API


class Net(nn.Module):
    """A user's model, not from the zoo: MNIST-1D inputs (1, 40) to 10 classes."""

    def __init__(self, width: int, fail: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(40, width), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(width, 10)
        self.fail = fail

    def forward(self, x):
        if self.fail:
            raise RuntimeError("the user's teacher broke")
        return self.head(self.body(x))


def _lent_teacher(fail: bool = False) -> nn.Module:
    torch.manual_seed(0)
    teacher = Net(32, fail)
    teacher.train()
    teacher.body.eval()  # a mix of modes and of requires_grad: all must come back as they were
    teacher.head.weight.requires_grad_(False)
    return teacher


def _state(model: nn.Module) -> tuple:
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def test_distill_user_modules_on_a_dataset_name_gives_the_teacher_back_as_it_came():
    teacher = _lent_teacher()
    modes, grads, weights = _state(teacher)
    student = Net(16)
    out = dk.distill(student, teacher, "mnist1d", epochs=1, config={"data": {"params": {"num_samples": 600}}})
    distilled = out.distilled or out  # the default keeps the better of it and the student alone
    assert distilled.model is student and out.kept in ("distilled", "alone")
    assert out.teacher is not None and out.teacher["source"] == "given"  # evaluated for the verdict, not trained
    assert distilled.entry["epochs"] == 1 and distilled.entry["role"] == "student"
    assert distilled.spec["custom"] is True
    after_modes, after_grads, after_weights = _state(teacher)
    assert (after_modes, after_grads) == (modes, grads)
    assert all(torch.equal(weights[k], after_weights[k]) for k in weights)  # the teacher was only read


def test_the_teacher_comes_back_as_it_came_when_training_fails():
    teacher = _lent_teacher(fail=True)
    modes, grads, _ = _state(teacher)
    with pytest.raises(RuntimeError, match="the user's teacher broke"):
        dk.distill(Net(16), teacher, "mnist1d", epochs=1, config={"data": {"params": {"num_samples": 600}}})
    assert _state(teacher)[:2] == (modes, grads)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda t: dk.distill(Net(8), t, "mnist1d", config={"student": {"params": {"hidden": [4]}}}),
            r"student\.params: the student is given as an nn\.Module \(Net\), so these settings would not apply",
        ),
        (
            lambda t: dk.distill("mlp", t, "mnist1d", config={"teacher": {"train": {"epochs": 3}}}),
            r"teacher\.train: the teacher is given as an nn\.Module",
        ),
        (
            lambda t: dk.distill("mlp", t, "mnist1d", config={"seeds": [0, 1]}),
            r"config\.seeds: the Python API trains one seed \(seed=0\)",
        ),
        (
            lambda t: dk.distill("mlp", t, "mnist1d", config={"teachers": [{"name": "mlp"}]}),
            r"teachers: dk\.distill takes one teacher",
        ),
        (lambda t: dk.distill("mlp", t, "mnist1d", config={"scheme": "mutual"}), r"scheme: dk\.distill trains offline"),
        (lambda t: dk.distill("mlpp", t, "mnist1d"), r"unknown model 'mlpp'.*Did you mean 'mlp'"),
        (lambda t: dk.distill("mlp", t, "mnist1dd"), r"unknown dataset 'mnist1dd'"),
        (
            lambda t: dk.distill("mlp", t, "mnist1d", config={"data": {"params": {"num_sample": 600}}}),
            r"data\.params.*num_sample",
        ),
        (lambda t: dk.distill("mlp", t, "mnist1d", losses={"kd": {"T": -1}}), r"losses\.kd\.T"),
        (lambda t: dk.distill("mlp", t, 42), r"data: expected a dataset name .* got int"),
        (lambda t: dk.distill("mlp", t, "mnist1d", config=[1]), r"config: expected a mapping"),
        (
            lambda t: dk.train(Net(8), "mnist1d", config={"teacher": {"name": "cnn1d"}}),
            r"teacher: dk\.train trains one model alone",
        ),
    ],
)
def test_api_mistakes_are_one_error_before_anything_runs(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    teacher = _lent_teacher()
    modes, grads, _ = _state(teacher)
    with pytest.raises(DarkKnowledgeError, match=message):
        call(teacher)
    assert _state(teacher)[:2] == (modes, grads)
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing trained


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        (
            ((torch.randn(20, 8), torch.arange(20) % 4), (torch.randn(10, 8), torch.arange(10) % 4)),
            {"num_classes": 3},
            r"data: label 3 is outside the class range 0\.\.2 of num_classes=3",
        ),
        (
            ((torch.randn(20, 8), torch.arange(20) % 4), (torch.randn(10, 9), torch.arange(10) % 4)),
            {},
            r"data: test inputs have shape \(9,\) per sample but training inputs \(8,\)",
        ),
        (
            ((torch.randn(20, 8), torch.rand(20)), (torch.randn(10, 8), torch.arange(10) % 4)),
            {},
            r"labels must be integers",
        ),
        (
            (
                (torch.randn(20, 8), torch.zeros(20, dtype=torch.long)),
                (torch.randn(10, 8), torch.zeros(10, dtype=torch.long)),
            ),
            {},
            r"data: the labels hold 1 class\(es\); a classifier needs at least 2",
        ),
        (
            ((torch.randn(20, 8), torch.arange(20) % 4), (torch.randn(10, 8), torch.arange(10) % 4)),
            {"config": {"data": {"train_samples": 8}}},  # val_fraction carves given tensors; a subset does not
            r"data\.train_samples: the data is given as tensors",
        ),
    ],
)
def test_bad_tensors_are_one_config_error(data, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        dk.train(nn.Linear(8, 4), data, epochs=1, **kwargs)
