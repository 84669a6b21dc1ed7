"""``train.steps``: a budget of exactly that many optimizer steps, the LR schedule spanning them."""

import json
import math

import pytest
import torch

from darkknowledge.config import SchedulerConfig, TrainConfig, load_config
from darkknowledge.engine.optim import lr_factor, step_budget
from darkknowledge.errors import ConfigError


def test_steps_and_a_non_default_epochs_are_refused() -> None:
    assert load_config(None, ["train.steps=50"]).train.steps == 50
    assert load_config(None).train.steps is None
    with pytest.raises(ConfigError, match=r"steps=50 and epochs=3 are two budgets.*default \(10\)"):
        load_config(None, ["train.steps=50", "train.epochs=3"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=0"])
    cfg = load_config({"teacher": {"name": "mlp", "train": {"epochs": 3}}}, ["train.steps=50"])
    with pytest.raises(ConfigError, match=r"teacher.train: steps=50 and epochs=3"):
        cfg.teacher_train()
    cfg = load_config({"teacher": {"name": "mlp", "train": {"epochs": 3, "steps": None}}}, ["train.steps=50"])
    assert cfg.teacher_train().epochs == 3 and cfg.teacher_train().steps is None


def test_step_budget_counts_epochs() -> None:
    assert step_budget(TrainConfig(epochs=4), 15) == (4, None)
    assert step_budget(TrainConfig(steps=37), 15) == (3, 37)  # 15 + 15 + 7
    assert step_budget(TrainConfig(steps=30), 15) == (2, 30)
    assert step_budget(TrainConfig(steps=9, grad_accum=2), 15) == (2, 9)  # 8 optimizer steps per epoch


def test_cosine_over_a_fractional_span_reaches_its_floor_at_the_last_step() -> None:
    cfg = SchedulerConfig(name="cosine", min_lr_ratio=0.1)
    span = 37 / 15
    assert lr_factor(cfg, 0, 15, span) == pytest.approx(1.0)
    assert lr_factor(cfg, 36, 15, span) > 0.1 + 1e-6
    assert lr_factor(cfg, 37, 15, span) == pytest.approx(0.1)
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 37))
    assert lr_factor(cfg, 15, 15, span) == pytest.approx(mid)


def _data() -> tuple:
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))  # the same data on every call
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return (x, y), (x[:100], y[:100])


def _train_records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


@pytest.mark.slow
def test_a_stage_takes_exactly_the_steps_and_the_lr_spans_them(tmp_path, monkeypatch) -> None:
    import darkknowledge as dk_api
    from darkknowledge.schemes.task import FlowTask

    calls = {"n": 0}
    original = FlowTask.training_step

    def count(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlowTask, "training_step", count)
    sched = {"name": "cosine", "min_lr_ratio": 0.1}
    config = {"train": {"steps": 37, "device": "cpu", "scheduler": sched}}
    out = dk_api.train("mlp", _data(), batch_size=20, lr=0.01, seed=1, out=tmp_path / "run", config=config)
    assert calls["n"] == 37  # 15 batches a epoch: 15 + 15 + 7
    assert out.entry["steps"] == 37
    records = _train_records(tmp_path / "run")
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 15), (2, 30), (3, 37)]
    floor = 0.1 * 0.01
    assert records[-1]["lr"] == pytest.approx(floor)  # the floor after the last step, not before
    spans_steps = floor + (0.01 - floor) * 0.5 * (1 + math.cos(math.pi * 15 / 37))
    assert records[0]["lr"] == pytest.approx(spans_steps)  # the cosine runs over 37 steps, not 3 epochs

    calls["n"] = 0
    config = {"train": {"steps": 9, "grad_accum": 2, "device": "cpu"}}
    out = dk_api.train("mlp", _data(), batch_size=20, lr=0.01, seed=1, config=config)
    assert out.entry["steps"] == 9 and calls["n"] == 17  # 8 steps of 15 batches, then 1 step of 2


@pytest.mark.slow
def test_resume_inside_the_cut_short_epoch_gives_the_same_weights(tmp_path, monkeypatch) -> None:
    import darkknowledge as dk_api
    from darkknowledge.engine.checkpoint import safe_load
    from darkknowledge.schemes.task import FlowTask

    kw = dict(
        batch_size=20,
        lr=0.01,
        seed=3,
        config={"train": {"steps": 37, "checkpoint_every_steps": 4, "deterministic": True, "device": "cpu"}},
    )
    reference = dk_api.train("mlp", _data(), out=tmp_path / "ref", **kw)

    original = FlowTask.training_step
    calls = {"n": 0}

    def crash_at_step_35(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 35:  # epoch 3 of the budget, after the checkpoint at step 32
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlowTask, "training_step", crash_at_step_35)
    with pytest.raises(KeyboardInterrupt):
        dk_api.train("mlp", _data(), out=tmp_path / "cut", **kw)
    monkeypatch.setattr(FlowTask, "training_step", original)
    state = safe_load(tmp_path / "cut" / "mlp-s3" / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (2, 2, 32)
    resumed = dk_api.train("mlp", _data(), out=tmp_path / "cut", resume=True, **kw)
    ref_w, res_w = reference.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(ref_w[k], res_w[k]) for k in ref_w)
    assert resumed.entry["steps"] == reference.entry["steps"] == 37
    assert _train_records(tmp_path / "cut")[-1]["lr"] == pytest.approx(_train_records(tmp_path / "ref")[-1]["lr"])
