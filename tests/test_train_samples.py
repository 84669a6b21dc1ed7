"""``data.train_samples``: a class-stratified, seeded subset of the training split."""

import pytest
import torch

from darkknowledge.config import load_config
from darkknowledge.data import load_dataset
from darkknowledge.data.splits import stratified_subset
from darkknowledge.errors import ConfigError


def _rows(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r.flatten().tolist()) for r in x}


def test_subset_keeps_each_class_share() -> None:
    y = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    keep = stratified_subset(y, 20, seed=0)
    assert keep.numel() == 20 and keep.unique().numel() == 20
    assert torch.equal(keep, keep.sort().values)
    assert torch.bincount(y[keep], minlength=3).tolist() == [12, 6, 2]


def test_subset_gives_every_class_one_sample_even_when_rare() -> None:
    y = torch.tensor([0] * 97 + [1] * 2 + [2])
    counts = torch.bincount(y[stratified_subset(y, 3, seed=5)], minlength=3)
    assert counts.tolist() == [1, 1, 1]
    counts = torch.bincount(y[stratified_subset(y, 10, seed=5)], minlength=3)
    assert counts.tolist() == [8, 1, 1]  # 9.7, 0.2, 0.1 -> at least one each, the rest by share


def test_subset_is_deterministic_and_seeded() -> None:
    y = torch.arange(200) % 4
    a, b = stratified_subset(y, 40, seed=1), stratified_subset(y, 40, seed=1)
    c = stratified_subset(y, 40, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.bincount(y[c], minlength=4).tolist() == [10, 10, 10, 10]


@pytest.mark.parametrize("n", [2, 102, 0])
def test_subset_out_of_range_names_value_and_range(n: int) -> None:
    y = torch.arange(101) % 3
    with pytest.raises(ConfigError, match=rf"data.train_samples={n}: expected an integer from 3 .* to 101"):
        stratified_subset(y, n, seed=0)


def test_load_dataset_subset_after_the_validation_split() -> None:
    full = load_dataset("digits", val_fraction=0.25)
    a = load_dataset("digits", val_fraction=0.25, train_subset=100)
    b = load_dataset("digits", val_fraction=0.25, train_subset=100)
    c = load_dataset("digits", val_fraction=0.25, train_subset=100, split_seed=1)
    assert len(a.train) == 100
    assert torch.equal(a.val.x, full.val.x) and torch.equal(a.test.x, full.test.x)  # only train shrinks
    assert _rows(a.train.x) <= _rows(full.train.x)  # drawn from what val_fraction left for training
    assert torch.equal(a.train.x, b.train.x)
    assert not torch.equal(a.train.x, c.train.x)
    counts = torch.bincount(a.train.y, minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11  # digits has ~10% per class
    assert a.transfer is full.transfer or (a.transfer is None and full.transfer is None)  # the rest is not transfer
    assert len({full.info.fingerprint, a.info.fingerprint, c.info.fingerprint}) == 3
    assert load_dataset("digits", val_fraction=0.25, train_subset=99).info.fingerprint != a.info.fingerprint


def test_subset_with_holdout_val() -> None:
    a = load_dataset("digits", val_fraction=0.2, holdout="val", train_subset=50)
    full = load_dataset("digits", val_fraction=0.2, holdout="val")
    assert len(a.train) == 50 and a.val is None
    assert torch.equal(a.test.x, full.test.x)


def test_load_dataset_rejects_a_subset_larger_than_the_split() -> None:
    n = len(load_dataset("digits", val_fraction=0.5).train)
    with pytest.raises(ConfigError, match=rf"data.train_samples={n + 1}: .* from 10 .* to {n}"):
        load_dataset("digits", val_fraction=0.5, train_subset=n + 1)
    with pytest.raises(ConfigError, match=r"data.train_samples=9: .* from 10 \(one sample per class"):
        load_dataset("digits", train_subset=9)


def test_config_field_validates() -> None:
    assert load_config(None).data.train_samples is None
    assert load_config(None, ["data.train_samples=64"]).data.train_samples == 64
    with pytest.raises(ConfigError, match="data.train_samples"):
        load_config(None, ["data.train_samples=0"])
    with pytest.raises(ConfigError, match="data.train_samples"):
        load_config(None, ["data.train_samples=many"])


@pytest.mark.slow
def test_a_run_trains_on_exactly_n_samples(tmp_path, monkeypatch) -> None:
    import darkknowledge as dk_api
    from darkknowledge.schemes.task import FlowTask

    seen: list[torch.Tensor] = []
    original = FlowTask.training_step

    def record(self, model, batch, progress, *rest):
        seen.append(batch.idx.detach().cpu().clone())
        return original(self, model, batch, progress, *rest)

    monkeypatch.setattr(FlowTask, "training_step", record)
    result = dk_api.train(
        "mlp",
        "digits",
        epochs=2,
        batch_size=16,
        config={"data": {"train_samples": 40}, "train": {"device": "cpu"}},
    )
    assert len(seen) == 2 * 3  # ceil(40 / 16) batches per epoch
    idx = torch.cat(seen)
    assert idx.numel() == 80 and idx.unique().numel() == 40 and int(idx.max()) < 40
    assert result.entry["steps"] == 6
