"""The contract of every registered scheme, run on its ``example`` recipe: it trains, gradients
reach its trainable module and never a frozen teacher, its exported model rebuilds from its spec,
and an interrupted run resumes to identical weights."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from darkknowledge import commands
from darkknowledge.config import deep_merge, load_config
from darkknowledge.engine.checkpoint import load_exported
from darkknowledge.engine.task import MAIN, Task
from darkknowledge.losses.base import SetupInfo
from darkknowledge.runs.build import make_loaders
from darkknowledge.runs.context import RunContext
from darkknowledge.schemes import SCHEMES
from darkknowledge.schemes.synthetic import STUDENT, SyntheticTask
from darkknowledge.schemes.task import FlowTask

BASE: dict[str, Any] = {
    "name": "contract",
    "seeds": [0],
    "data": {"name": "mnist1d", "params": {"num_samples": 300, "transfer_samples": 60}, "batch_size": 60},
    "teacher": {"name": "cnn1d", "params": {"channels": 8}, "train": {"epochs": 1, "optimizer": {"lr": 0.01}}},
    "student": {"name": "mlp", "params": {"hidden": [16]}},
    "losses": {"ce": {}, "kd": {"T": 4.0, "alpha": 1.0}},
    "train": {
        "epochs": 2,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "scheduler": {"name": "constant"},
        "deterministic": True,
        "device": "cpu",
    },
}


def recipe(name: str, **changes: Any):
    """``BASE`` with the scheme's ``example`` over it (top-level keys replaced) and ``changes`` merged."""
    example = dict(SCHEMES.get(name).example)
    params = example.pop("scheme", {}).get("params", {})
    raw = {**BASE, **example, "scheme": {"name": name, "params": params}}
    return load_config(deep_merge(raw, changes))


def check_gradients(ctx: RunContext, task: Task, seed: int, with_transfer: bool) -> None:
    """One step of every part on one batch: every trainable parameter gets a gradient from its
    part's loss (generators and discriminators included), no frozen teacher does."""
    s = ctx.session
    loader = task.training_data(seed, s.device, s.dist)  # a task's own batches (latent codes), or the split's
    if loader is None:
        loader, _, _ = make_loaders(ctx.cfg, s.bundle, seed, s.device, s.dist, with_transfer=with_transfer)
    task.to(s.device)
    task.attach(loader, s.dist)
    loader.set_epoch(0)
    batch = next(iter(loader))
    task.setup(batch, SetupInfo(num_samples=len(loader.data), batch_size=len(batch)))
    task.module.train()
    parts = task.parts()
    missing = []
    for i, part in enumerate(parts):
        loss, terms = task.training_step(task.module, batch, 0.0, part.name)
        loss.backward()
        assert torch.isfinite(loss), part.name
        if part.name in (MAIN, STUDENT):
            assert set(terms) <= set(task.describe()["losses"])
        missing += [
            n
            for n, p in part.module.named_parameters()
            if p.requires_grad and p.grad is None and id(p) in {id(q) for q in part.parameters()}
        ]
        for later in parts[i + 1 :]:  # the next part's step starts from zero gradients, as in the engine
            later.module.zero_grad(set_to_none=True)
    assert not missing, f"trainable parameters without a gradient (DDP needs them all): {missing}"
    teachers = getattr(task, "teachers", None) or [task.teacher]  # type: ignore[attr-defined]
    for teacher in teachers:
        if teacher.standalone and teacher.model is not None:  # a frozen model
            assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters()), teacher.name
    task.module.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", SCHEMES.names())
def test_scheme_trains_with_gradients_in_the_right_place_and_exports(name, tmp_path, monkeypatch):
    checked: list[str] = []
    original = RunContext.train

    def checking(self, stage, task, seed, *args, **kwargs):
        check_gradients(self, task, seed, kwargs.get("with_transfer", False))
        checked.append(stage)
        return original(self, stage, task, seed, *args, **kwargs)

    monkeypatch.setattr(RunContext, "train", checking)
    out = commands.distill(recipe(name), out=tmp_path / "run", progress=False)
    entry = out["student"]
    assert entry["name"] in checked  # every stage was checked before it trained
    assert entry["scheme"] == name and entry["epochs"] == 2
    spec, _ = load_exported(tmp_path / "run" / "student.pt")
    rebuilt = commands.evaluate_checkpoint(tmp_path / "run" / "student.pt")  # rebuilt from its spec alone
    assert rebuilt["model"] == spec["name"] and rebuilt["top1"] == pytest.approx(entry["last_acc"], abs=0.01)


def training_steps(run_dir) -> int:
    """Optimizer steps of the stages this run trained (teachers, reused, excluded)."""
    models = json.loads((run_dir / "results.json").read_text())["models"]
    return sum(e.get("steps") or 0 for e in models if e["role"] != "teacher" and "member_of" not in e)


@pytest.mark.parametrize("name", SCHEMES.names())
def test_interrupted_run_resumes_to_identical_weights(name, tmp_path, monkeypatch):
    cfg = recipe(name)
    commands.distill(cfg, out=tmp_path / "ref", progress=False)  # also trains (and keeps) any teacher
    total = training_steps(tmp_path / "ref")
    calls = {"n": 0}
    originals = {cls: cls.training_step for cls in (FlowTask, SyntheticTask)}

    def interrupting(original):
        def interrupt(self, model, batch, progress, part=MAIN):
            calls["n"] += 1
            if calls["n"] == total - 1:  # in the last epoch of the last stage, after its first checkpoint
                raise KeyboardInterrupt  # (several parts: one call per part and batch, so a little earlier)
            return original(self, model, batch, progress, part)

        return interrupt

    for cls, original in originals.items():
        monkeypatch.setattr(cls, "training_step", interrupting(original))
    with pytest.raises(KeyboardInterrupt):
        commands.distill(cfg, out=tmp_path / "cut", progress=False)
    for cls, original in originals.items():
        monkeypatch.setattr(cls, "training_step", original)
    commands.distill(cfg, out=tmp_path / "cut", resume=True, progress=False)
    _, a = load_exported(tmp_path / "ref" / "student.pt")
    _, b = load_exported(tmp_path / "cut" / "student.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
