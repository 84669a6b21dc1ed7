"""Function matching (Beyer et al., CVPR 2022): mixed views between training points, the teacher
scoring exactly the input the student trains on, live and from the teacher-output cache."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

import darkknowledge as dk
from darkknowledge.config import load_config
from darkknowledge.data import Augment, BatchLoader, TensorData
from darkknowledge.data.batch import UNLABELED
from darkknowledge.data.mixing import box_mask, mixed_samples
from darkknowledge.engine.trainer import Trainer
from darkknowledge.errors import ConfigError
from darkknowledge.models import create_model
from darkknowledge.teachers.cache import CacheSpec, load_or_build
from darkknowledge.teachers.frozen import FrozenTeacher


def signals(n: int = 60, shape: tuple[int, ...] = (12,), seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randn(n, *shape, generator=g), torch.arange(n) % 5)


class Plain(Dataset):
    """A map-style dataset that is not a TensorData (the loader's generic path)."""

    def __init__(self, data: TensorData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i]


def expected_mix(x: torch.Tensor, partner: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mixup written out per sample: lam * x + (1 - lam) * partner; cutmix: the partner's box pasted."""
    out = x.clone()
    for b in range(x.shape[0]):
        lam = float(params["mix_lam"][b])
        if lam < 1:
            out[b] = lam * x[b] + (1 - lam) * partner[b]
        if "mix_box" in params:
            top, bottom, left, right = params["mix_box"][b].tolist()
            if x.ndim == 4:
                out[b, :, top:bottom, left:right] = partner[b, :, top:bottom, left:right]
            else:
                out[b, ..., left:right] = partner[b, ..., left:right]
    return out


# ---------------------------------------------------------------- the views


@pytest.mark.parametrize("generic", [False, True])
def test_mixup_blends_each_sample_with_its_partner_by_dataset_index(generic: bool) -> None:
    data = signals()
    loader = BatchLoader(Plain(data) if generic else data, 16, seed=3, augment={"mixup": 1.0})
    loader.set_epoch(2)
    for k, batch in enumerate(loader):
        params = loader.augment_params(k)
        assert params is not None and set(params) == {"mix_partner", "mix_lam"}
        partner = data.x[params["mix_partner"]]  # rows of the dataset, not of the batch
        torch.testing.assert_close(batch.x, expected_mix(data.x[batch.idx], partner, params))
        mixed = mixed_samples(params) & (params["mix_partner"] != batch.idx)
        assert (
            bool(mixed.all()) or int((~mixed).sum()) <= 1
        )  # mix_prob 1: all (a sample drawn as its own partner aside)
        assert float(params["mix_lam"].min()) > 0 and float(params["mix_lam"].max()) < 1
        assert torch.equal(batch.y, torch.where(mixed, torch.full_like(batch.y, UNLABELED), data.y[batch.idx]))
        assert not batch.labeled


def test_mix_prob_leaves_the_rest_as_they_were_and_labelled() -> None:
    data = signals(400)
    loader = BatchLoader(data, 100, seed=1, augment={"mixup": 0.4, "mix_prob": 0.3})
    loader.set_epoch(0)
    mixed_count = 0
    for k, batch in enumerate(loader):
        params = loader.augment_params(k)
        assert params is not None
        mixed = mixed_samples(params) & (params["mix_partner"] != batch.idx)  # with itself: unchanged
        mixed_count += int(mixed.sum())
        raw = data.x[batch.idx]
        assert torch.equal(batch.x[~mixed], raw[~mixed])  # bit for bit
        assert torch.equal(batch.y[~mixed], data.y[batch.idx][~mixed])
        assert bool((batch.y[mixed] == UNLABELED).all())
    assert 0.22 < mixed_count / 400 < 0.38


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 40), (40,)])
def test_cutmix_pastes_the_partners_box(shape: tuple[int, ...]) -> None:
    data = signals(200, shape)
    loader = BatchLoader(data, 200, seed=5, augment={"cutmix": 1.0})
    loader.set_epoch(0)
    batch = next(iter(loader))
    params = loader.augment_params(0)
    assert params is not None and float(params["mix_lam"].min()) == 1.0  # cutmix pastes, never blends
    partner = data.x[params["mix_partner"]]
    torch.testing.assert_close(batch.x, expected_mix(data.x[batch.idx], partner, params), rtol=0, atol=0)
    inside = box_mask(params["mix_box"], tuple(batch.x.shape)).expand_as(batch.x)
    area = inside.flatten(1).float().mean(1)  # (n,) the pasted share of each input
    # a box of area 1 - lam, lam ~ Beta(1, 1) (a half on average), centred anywhere and clipped at the edges
    assert 0.2 < float(area.mean()) < 0.6 and float(area.max()) > 0.7
    assert bool((mixed_samples(params) == (area > 0)).all())


def test_mixup_and_cutmix_together_split_the_samples() -> None:
    data = signals(300, (1, 8, 8))
    params = BatchLoader(data, 300, seed=2, augment={"mixup": 1.0, "cutmix": 1.0}).augment_params(0)
    assert params is not None
    blended = params["mix_lam"] < 1
    boxed = mixed_samples(params) & ~blended
    assert not bool((blended & (params["mix_box"][:, 3] > params["mix_box"][:, 2])).any())  # one or the other
    assert 100 < int(blended.sum()) < 200 and 100 < int(boxed.sum()) < 200


def test_mixup_of_tabular_features_with_the_other_transforms() -> None:
    data = signals(64, (7,))
    aug = Augment(mixup=2.0, scale=0.2, noise=0.05)
    loader = BatchLoader(data, 32, seed=4, augment=aug)
    loader.set_epoch(1)
    batch = next(iter(loader))
    params = loader.augment_params(0, epoch=1)
    assert params is not None
    mixed = expected_mix(data.x[batch.idx], data.x[params["mix_partner"]], params)
    torch.testing.assert_close(batch.x, mixed * params["scale"].view(-1, 1) + params["noise"])  # mixing comes first


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_see_the_single_process_mixed_views(world_size: int) -> None:
    kwargs = dict(seed=7, augment={"mixup": 1.0, "cutmix": 0.5, "mix_prob": 0.7, "shift": 2})
    data = signals(70, (1, 20))
    single = BatchLoader(data, 12, **kwargs)
    ranks = [BatchLoader(data, 12, rank=r, world_size=world_size, **kwargs) for r in range(world_size)]
    for loader in [single, *ranks]:
        loader.set_epoch(3)
    expected = list(single)
    per_rank = [list(loader) for loader in ranks]
    assert any(bool((b.y == UNLABELED).any()) for b in expected)
    for k, batch in enumerate(expected):
        torch.testing.assert_close(torch.cat([b[k].x for b in per_rank]), batch.x, rtol=0, atol=0)
        assert torch.equal(torch.cat([b[k].y for b in per_rank]), batch.y)


def test_a_resumed_epoch_gives_the_same_mixed_batches() -> None:
    loader = BatchLoader(signals(), 8, seed=2, augment={"mixup": 1.0, "scale": 0.3})
    loader.set_epoch(1)
    full = list(loader)
    tail = list(loader.iter_from(3))
    for a, b in zip(full[3:], tail, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_mixing_settings_are_validated() -> None:
    cfg = load_config(None, ["data.augment.mixup=1.0", "data.augment.mix_prob=0.5"])
    assert cfg.data.augment.enabled() and cfg.data.augment.mixes()
    with pytest.raises(ConfigError, match=r"mix_prob=0.5 has nothing to mix"):
        load_config(None, ["data.augment.mix_prob=0.5"])
    with pytest.raises(ConfigError, match=r"data.augment.mix_prob"):
        load_config(None, ["data.augment.mixup=1", "data.augment.mix_prob=0"])
    with pytest.raises(ConfigError, match=r"data.augment.cutmix"):
        load_config(None, ["data.augment.cutmix=-1"])
    with pytest.raises(ConfigError, match=r"data.augment.mix_prob=0.5 has nothing to mix"):
        Augment(mix_prob=0.5)
    assert Augment(mixup=1.0, shift=2).without_mixing() == Augment(shift=2)
    assert Augment(mixup=1.0).without_mixing() is None
    with pytest.raises(ValueError, match="partners"):
        Augment(mixup=1.0).apply(torch.zeros(2, 3), {"mix_partner": torch.zeros(2, dtype=torch.long)})


# ---------------------------------------------------------------- the teacher sees the student's view


def cnn_teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn1d", num_classes=5, input_shape=(1, 40), channels=8)


def test_cached_mixed_views_replay_exactly(tmp_path) -> None:
    data = signals(48, (1, 40), seed=1)
    model = cnn_teacher()
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    teacher = FrozenTeacher(model)
    aug = Augment(mixup=1.0, cutmix=1.0, mix_prob=0.8, shift=3, scale=0.2, noise=0.05)
    train = BatchLoader(data, 16, seed=3, augment=aug)
    spec = CacheSpec(logits=True, views=3, dtype="fp32")
    cache = load_or_build(teacher, train, spec, augment=aug, seed=1, memory_limit_mb=9, root=tmp_path)
    built = torch.cat(seen).view(3, 48, 1, 40)  # what the teacher scored, by (view, sample): built in order
    train.replay = cache.replay(train.seed)
    views = set()
    for epoch in range(3):
        train.set_epoch(epoch)
        for batch in train:
            assert batch.view is not None
            views |= set(batch.view.tolist())
            # the student's input is bit for bit the input the teacher scored for this view ...
            assert torch.equal(batch.x, built[batch.view, batch.idx])
            # ... the stored draw replays it, its partner fetched by dataset index ...
            stored = cache.view_params(batch.idx, batch.view)
            replayed = aug.apply(data.x[batch.idx], stored, partner=data.x[stored["mix_partner"]])
            torch.testing.assert_close(batch.x, replayed)
            mixed = mixed_samples(stored) & (stored["mix_partner"] != batch.idx)
            assert torch.equal(batch.y == UNLABELED, mixed)
            # ... and the cached outputs are the teacher's on it
            torch.testing.assert_close(cache.outputs(batch.idx, batch.view, batch.x.device).logits, model(batch.x))
    assert views == {0, 1, 2}


def tensors(n: int = 96, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 40, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return (x, y), (x[:32], y[:32])


def trainer_phases(monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """``{"now": phase}``: ``start`` inside ``Trainer._start`` (attach: a cache is built there; the dry
    run), ``train`` for the rest of ``Trainer.fit`` (the epochs), None outside it (e.g. the measures
    of the results entry, which run the teacher on the test split)."""
    phase: dict[str, str | None] = {"now": None}
    start, fit = Trainer._start, Trainer.fit

    def phased_start(self: Trainer, resume: bool) -> None:
        phase["now"] = "start"
        start(self, resume)
        phase["now"] = "train"

    def phased_fit(self: Trainer, resume: bool = False) -> Any:
        try:
            return fit(self, resume)
        finally:
            phase["now"] = None

    monkeypatch.setattr(Trainer, "_start", phased_start)
    monkeypatch.setattr(Trainer, "fit", phased_fit)
    return phase


def recording(model: torch.nn.Module, phase: dict[str, str | None], want: str, training: bool = False) -> list:
    """The inputs of ``model``'s forwards in trainer phase ``want`` (only in train mode, when ``training``)."""
    calls: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if phase["now"] == want and (module.training or not training):
            calls.append(args[0].detach().clone())

    model.register_forward_pre_hook(hook)
    return calls


FM = {"mixup": 1.0, "shift": 3, "scale": 0.2, "noise": 0.05}
"""Function matching's views on 1-D signals: mixup, time shift, amplitude scale, jitter."""


@pytest.mark.slow
@pytest.mark.parametrize("live_batches", [1, 3])
def test_the_live_teacher_scores_exactly_the_students_input(live_batches: int, monkeypatch) -> None:
    (x, y), test = tensors()
    teacher = cnn_teacher()
    student = create_model("mlp", num_classes=5, input_shape=(1, 40), hidden=[16])
    phase = trainer_phases(monkeypatch)
    scored, trained = recording(teacher, phase, "train"), recording(student, phase, "train", training=True)
    cfg = {"data": {"batch_size": 16, "augment": FM}, "cache": {"live_batches": live_batches}}
    out = dk.distill(student, teacher, ((x, y), test), {"kd": {"T": 1.0, "alpha": 1.0}}, epochs=2, config=cfg)
    assert out.entry["steps"] == 12
    assert len(scored) == (12 if live_batches == 1 else 4)  # one batch, or 3 batches at once
    students = torch.cat(trained)  # (192, 1, 40): 2 epochs of 96 mixed views
    assert torch.equal(torch.cat(scored), students)  # the same views, in the same order
    raw = {tuple(r.flatten().tolist()) for r in x}
    assert sum(tuple(r.flatten().tolist()) not in raw for r in students) > 180  # views, not the stored samples


@pytest.mark.slow
def test_the_cached_teacher_scored_exactly_the_students_input(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DK_CACHE", str(tmp_path / "cache"))  # this teacher's cache is built here, not reused
    (x, y), test = tensors(seed=1)
    teacher = cnn_teacher(1)
    student = create_model("mlp", num_classes=5, input_shape=(1, 40), hidden=[16])
    phase = trainer_phases(monkeypatch)
    scored, trained = recording(teacher, phase, "start"), recording(student, phase, "train", training=True)
    live = recording(teacher, phase, "train")
    cfg = {"data": {"batch_size": 16, "augment": FM}, "cache": {"enabled": True, "views": 2, "dtype": "fp32"}}
    out = dk.distill(student, teacher, ((x, y), test), {"kd": {"T": 1.0, "alpha": 1.0}}, epochs=3, config=cfg)
    assert out.entry["teacher_cache"]["views"] == 2 and not out.entry["teacher_cache"]["reused"]
    assert not live  # the cached teacher does not run while the student trains
    built = torch.cat(scored)  # the cache build: views 0 and 1 of every sample, in order
    assert built.shape == (2 * 96, 1, 40)
    students = torch.cat(trained)  # (288, 1, 40)
    stored = {tuple(r.flatten().tolist()) for r in built}
    assert all(tuple(r.flatten().tolist()) in stored for r in students)  # every student input: a scored view
    assert len({tuple(r.flatten().tolist()) for r in students}) > 150  # and both views of the samples show up


@pytest.mark.slow
def test_a_stage_without_a_teacher_trains_on_unmixed_labelled_views(monkeypatch) -> None:
    (x, y), test = tensors(seed=2)
    model = create_model("mlp", num_classes=5, input_shape=(1, 40), hidden=[16])
    trained = recording(model, trainer_phases(monkeypatch), "train", training=True)
    cfg = {"data": {"batch_size": 16, "augment": {"mixup": 1.0, "shift": 2}}}
    dk.train(model, ((x, y), test), epochs=1, config=cfg)
    shifted = {tuple(torch.roll(r, s, -1).flatten().tolist()) for r in x for s in range(-2, 3)}
    views = torch.cat(trained)
    assert views.shape == (96, 1, 40)
    # each view is a shifted stored sample (zero fill aside): no partner was mixed in
    assert all(tuple(v.flatten().tolist()) in shifted or bool((v == 0).any()) for v in views)
    assert sum(tuple(v.flatten().tolist()) in shifted for v in views) > 10


def test_label_reading_losses_on_inputs_that_are_all_mixed_are_refused() -> None:
    (x, y), test = tensors(seed=3)
    teacher = cnn_teacher()
    student = create_model("mlp", num_classes=5, input_shape=(1, 40), hidden=[8])
    cfg = {"data": {"batch_size": 16, "augment": {"mixup": 1.0}}}
    with pytest.raises(ConfigError, match=r"losses \['ce'.*\] read labels, but data.augment mixes every training"):
        dk.distill(student, teacher, ((x, y), test), {"ce": {}, "kd": {"alpha": 1.0}}, epochs=1, config=cfg)
