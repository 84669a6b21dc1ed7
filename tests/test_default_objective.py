"""The objective ``dk.distill`` uses when none is named (runs/default_objective.py), ``train.min_steps``,
the suite that chose the default (bench/suites/small-data.yaml), and ``dk.train``'s selection on the
validation split."""

import json

import pytest
import torch

import darkknowledge as dk
from darkknowledge.bench.cells import student_config
from darkknowledge.bench.suite import load_suite
from darkknowledge.config import DataConfig, OptimizerConfig, SchedulerConfig, TrainConfig, load_config
from darkknowledge.engine.distributed import DistContext
from darkknowledge.engine.metrics import evaluate
from darkknowledge.engine.optim import step_budget
from darkknowledge.errors import ConfigError
from darkknowledge.runs import default_objective
from darkknowledge.runs.build import build_data, make_loaders
from darkknowledge.runs.default_objective import default_config


def test_the_default_fills_what_the_user_left_out() -> None:
    losses, cfg = default_config(None, mixable=True, epochs_given=False)
    assert losses == {"kd": {"T": 1.0, "alpha": 1.0}}
    assert cfg == {
        "data": {"augment": {"mixup": 1.0}, "val_fraction": 0.1},
        "train": {"min_steps": 30_000},
        "scheme": {"params": {"keep_better": True}},
    }
    mine = {"data": {"augment": {"mixup": 0.0, "shift": 2}, "val_fraction": 0.2}, "train": {"steps": 500}}
    losses, cfg = default_config(mine, mixable=True, epochs_given=False)
    assert mine == {"data": {"augment": {"mixup": 0.0, "shift": 2}, "val_fraction": 0.2}, "train": {"steps": 500}}
    assert cfg == {**mine, "scheme": {"params": {"keep_better": True}}}  # theirs kept, not changed
    _, cfg = default_config({"data": {"augment": {"cutmix": 1.0}}}, mixable=True, epochs_given=True)
    assert cfg["data"]["augment"] == {"cutmix": 1.0} and cfg["train"] == {}  # epochs given: their budget
    losses, cfg = default_config(None, mixable=False, epochs_given=False)  # token ids: Hinton KD, no mixing
    assert losses == {"kd": {}} and cfg is None
    assert default_config([1], mixable=True, epochs_given=False)[1] == [1]  # left for the config check


@pytest.mark.parametrize(
    ("config", "validation", "keep", "fraction"),
    [
        (None, "own", True, None),  # the data has its own split: nothing carved
        (None, "unknown", False, None),  # an image folder may have one: not guessed
        ({"data": {"val_fraction": 0.0}}, "carve", False, 0.0),  # no split asked for: no choice
        ({"data": {"holdout": "val"}}, "carve", False, None),  # the carved split would be the test split
        ({"scheme": {"params": {"keep_better": False}}}, "carve", False, None),  # theirs: no split carved for it
    ],
)
def test_keep_better_only_with_a_validation_split(config, validation, keep, fraction, caplog) -> None:
    _, cfg = default_config(config, mixable=True, epochs_given=False, validation=validation)
    assert cfg["scheme"]["params"].get("keep_better", False) is keep
    assert cfg["data"].get("val_fraction") == fraction
    said = "cannot be checked against the student trained alone" in caplog.text
    assert said is (not keep and config != {"scheme": {"params": {"keep_better": False}}})


def test_min_steps_raises_the_epochs_of_a_small_set_only() -> None:
    assert step_budget(TrainConfig(epochs=10, min_steps=1000), 2) == (500, 1000)  # 20 steps < 1000
    assert step_budget(TrainConfig(epochs=10, min_steps=1000), 150) == (10, None)  # 1500 steps >= 1000
    assert step_budget(TrainConfig(epochs=10, min_steps=1000, grad_accum=2), 150) == (14, 1000)  # 750 steps
    with pytest.raises(ConfigError, match="steps=50 and min_steps=100"):
        load_config(None, ["train.steps=50", "train.min_steps=100"])


def _small() -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return (x, y), (x[:40], y[:40])


class _Teacher(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_distill_without_an_objective_matches_functions_patiently(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(default_objective, "MIN_STEPS", 40)  # the same rule, a short budget
    out = dk.distill("mlp", _Teacher(), _small(), batch_size=32, out=tmp_path / "run")
    distilled = out.distilled or out  # the better on validation is delivered: either may be
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert distilled.entry["losses"] == ["kd"] and distilled.entry["steps"] == 40 and distilled.entry["epochs"] == 20
    assert out.baseline is not None and out.baseline.entry["steps"] == 40  # the same budget alone
    assert distilled.entry["train_samples"] == 54  # 10% of the 60 held out for the choice
    for key in ("mixup: 1.0", "min_steps: 40", "T: 1.0", "val_fraction: 0.1", "keep_better: true"):
        assert key in saved
    records = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "train" for r in records)
    given = dk.distill("mlp", _Teacher(), _small(), epochs=3, batch_size=32)  # epochs given: 3 epochs
    assert (given.distilled or given).entry["epochs"] == 3 and (given.distilled or given).entry["steps"] == 6
    named = dk.distill("mlp", _Teacher(), _small(), {"kd": {}}, batch_size=32)  # an objective given: no mixing
    assert named.entry["epochs"] == 10 and named.entry["steps"] == 20 and named.kept is None


def test_token_ids_keep_hinton_kd_without_mixing() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (40, 6), generator=g)
    y = torch.randint(0, 3, (40,), generator=g)

    class Bag(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.EmbeddingBag(50, 8)
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(ids))

    out = dk.distill(Bag(), Bag(), ((x, y), (x, y)), epochs=1, batch_size=20)
    assert out.entry["losses"] == ["kd"] and out.entry["steps"] == 2


def test_the_small_data_suite_measures_exactly_the_default() -> None:
    """The suite's function_matching cell is what dk.distill does by default: same losses, mixing,
    budget, optimizer, schedule, batch, validation split and choice against the student alone."""
    suite = load_suite("small-data")
    losses, extra = default_config(None, mixable=True, epochs_given=False)
    for pair in suite.pairs:
        raw = student_config(suite, pair, "function_matching", 0, teacher_checkpoint="t.pt")
        assert raw["losses"] == losses
        assert raw["data"]["augment"]["mixup"] == extra["data"]["augment"]["mixup"]
        assert {k: v for k, v in raw["data"]["augment"].items() if k != "mixup"} == (
            suite.pairs[pair].budget.get("augment", {})
        )  # the rest is the pair's own augmentation, the same for the student alone
        train = TrainConfig(**raw["train"])
        assert train.epochs == default_objective.EPOCHS and train.min_steps == extra["train"]["min_steps"]
        assert train.optimizer == OptimizerConfig() and train.scheduler == SchedulerConfig()
        assert DataConfig(**raw["data"]).batch_size == DataConfig().batch_size
        assert raw["scheme"]["params"]["keep_better"] is extra["scheme"]["params"]["keep_better"] is True
        assert raw["data"]["val_fraction"] == extra["data"]["val_fraction"]  # the split the choice is made on
        alone = student_config(suite, pair, "ce", 0, teacher_checkpoint=None)
        assert alone["train"] == raw["train"] and "mixup" not in alone["data"].get("augment", {})


def test_dk_train_returns_the_epoch_best_on_the_validation_split(tmp_path) -> None:
    out = dk.train(
        "mlp",
        "mnist1d",
        epochs=6,
        lr=0.2,  # too high: an early epoch is the best
        config={"data": {"val_fraction": 0.2, "params": {"num_samples": 600, "transfer_samples": 0}}},
        out=tmp_path / "run",
    )
    evals = [
        json.loads(r)
        for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if json.loads(r).get("kind") == "eval"
    ]
    best = max(evals, key=lambda r: r["val"]["student"]["top1"])  # the first of ties, as the trainer keeps
    best = next(r for r in evals if r["val"]["student"]["top1"] == best["val"]["student"]["top1"])
    assert out.entry["best_selected_on"] == "val" and out.entry["best_epoch"] == best["epoch"] < 6
    assert out.accuracy == best["test"]["student"]["top1"]  # the selected epoch's test accuracy
    cfg = load_config(None, ["data.val_fraction=0.2", "data.params.num_samples=600", "data.params.transfer_samples=0"])
    _, test_loader, _ = make_loaders(cfg, build_data(cfg), 0, torch.device("cpu"), DistContext(), train=False)
    assert evaluate(out.model, test_loader, DistContext())["top1"] == pytest.approx(out.accuracy)  # its weights
