"""Tests of BatchLoader (order, resume, DDP slicing, conversion) and Augment."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from darkknowledge.data import Augment, Batch, BatchLoader, DataBundle, DatasetInfo, TensorData
from darkknowledge.data.augment import slice_params
from darkknowledge.data.loader import rank_bounds
from darkknowledge.errors import ConfigError


def float_data(n: int = 23, dim: int = 5) -> TensorData:
    x = torch.arange(n * dim, dtype=torch.float32).view(n, dim)  # row i starts at i * dim
    return TensorData(x, torch.arange(n) % 3)


def image_data(n: int = 20, seed: int = 0) -> TensorData:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 6, 6), generator=gen, dtype=torch.uint8)
    return TensorData(x, torch.arange(n) % 4)


def collect(loader: BatchLoader) -> list[Batch]:
    return list(loader)


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert torch.equal(p.idx, q.idx) and torch.equal(p.y, q.y)
        torch.testing.assert_close(p.x, q.x, rtol=0, atol=0)


# ---------------------------------------------------------------- order


@pytest.mark.parametrize("drop_last", [False, True])
def test_each_sample_once_per_epoch(drop_last: bool) -> None:
    data = float_data(23)
    loader = BatchLoader(data, 5, seed=3, drop_last=drop_last)
    batches = collect(loader)
    assert len(batches) == len(loader) == (4 if drop_last else 5)
    seen = torch.cat([b.idx for b in batches])
    if drop_last:
        assert seen.numel() == 20 and seen.unique().numel() == 20
    else:
        assert sorted(seen.tolist()) == list(range(23))
    for b in batches:  # x, y belong to idx
        assert torch.equal(b.x, data.x[b.idx]) and torch.equal(b.y, data.y[b.idx])
        assert b.y.dtype == torch.int64 and b.idx.dtype == torch.int64


def test_order_depends_only_on_seed_and_epoch() -> None:
    data = float_data(40)
    loader = BatchLoader(data, 8, seed=7)
    epoch0 = torch.cat([b.idx for b in loader])
    loader.set_epoch(1)
    epoch1 = torch.cat([b.idx for b in loader])
    assert not torch.equal(epoch0, epoch1)
    loader.set_epoch(0)
    assert torch.equal(torch.cat([b.idx for b in loader]), epoch0)  # same (seed, epoch): same order

    fresh = BatchLoader(data, 8, seed=7)
    fresh.set_epoch(1)  # no history needed
    assert torch.equal(torch.cat([b.idx for b in fresh]), epoch1)
    other_seed = BatchLoader(data, 8, seed=8)
    assert not torch.equal(torch.cat([b.idx for b in other_seed]), epoch0)
    unshuffled = BatchLoader(data, 8, shuffle=False)
    assert torch.equal(torch.cat([b.idx for b in unshuffled]), torch.arange(40))


def test_iter_from_equals_tail_of_full_epoch() -> None:
    data = image_data(22)
    aug = Augment(hflip=True, crop_padding=2, noise=0.1)
    loader = BatchLoader(data, 4, seed=5, augment=aug, normalize=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    loader.set_epoch(2)
    full = collect(loader)
    for k in (0, 3, len(loader) - 1, len(loader)):
        assert_same_batches(list(loader.iter_from(k)), full[k:])
    with pytest.raises(ConfigError, match="start_batch"):
        loader.iter_from(len(loader) + 1)


# ---------------------------------------------------------------- DDP slicing


def test_rank_bounds_even_and_uneven() -> None:
    assert [rank_bounds(8, r, 2) for r in range(2)] == [(0, 4), (4, 8)]
    assert [rank_bounds(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [rank_bounds(1, r, 3) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_concatenated_equal_single_process_with_augmentation(world_size: int) -> None:
    data = image_data(30)  # 30 = 3 full batches of 8 + one of 6
    kwargs = dict(
        seed=11,
        augment={"hflip": True, "crop_padding": 2, "shift": 1, "noise": 0.05},
        normalize=((0.4, 0.5, 0.6), (0.2, 0.3, 0.4)),
    )
    single = BatchLoader(data, 8, **kwargs)
    ranks = [BatchLoader(data, 8, rank=r, world_size=world_size, **kwargs) for r in range(world_size)]
    for epoch in (0, 1):
        for loader in [single, *ranks]:
            loader.set_epoch(epoch)
        expected = collect(single)
        per_rank = [collect(loader) for loader in ranks]
        assert all(len(batches) == len(expected) for batches in per_rank)
        for k, batch in enumerate(expected):
            parts = [batches[k] for batches in per_rank]
            if k < len(expected) - 1:
                assert all(len(p) == 8 // world_size for p in parts)
            assert torch.equal(torch.cat([p.idx for p in parts]), batch.idx)
            assert torch.equal(torch.cat([p.y for p in parts]), batch.y)
            torch.testing.assert_close(torch.cat([p.x for p in parts]), batch.x, rtol=0, atol=0)


def test_fewer_samples_than_ranks_gives_empty_batches() -> None:
    data = float_data(9)  # global batches of 4: 4, 4, 1
    ranks = [BatchLoader(data, 4, rank=r, world_size=4, seed=1) for r in range(4)]
    last = [collect(loader)[-1] for loader in ranks]
    assert [len(b) for b in last] == [1, 0, 0, 0]
    assert last[1].x.shape == (0, 5)
    assert all(len(loader) == 3 for loader in ranks)


def test_bad_loader_arguments() -> None:
    data = float_data(10)
    with pytest.raises(ConfigError, match="divisible by world_size"):
        BatchLoader(data, 5, world_size=2)
    with pytest.raises(ConfigError, match="rank"):
        BatchLoader(data, 4, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        BatchLoader(data, 0)
    with pytest.raises(ConfigError, match="data.augment.flip"):
        BatchLoader(data, 2, augment={"flip": True})


# ---------------------------------------------------------------- conversion and fallback


def test_uint8_scaled_and_normalised_per_channel() -> None:
    data = image_data(6)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    (batch,) = collect(BatchLoader(data, 6, shuffle=False, normalize=(mean, std)))
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    expected = (data.x.float() / 255 - m) / s
    assert batch.x.dtype == torch.float32
    torch.testing.assert_close(batch.x, expected)
    (plain,) = collect(BatchLoader(data, 6, shuffle=False))
    torch.testing.assert_close(plain.x, data.x.float() / 255)


def test_float_inputs_normalised_only_when_asked() -> None:
    data = float_data(4)
    (raw,) = collect(BatchLoader(data, 4, shuffle=False))
    assert torch.equal(raw.x, data.x)
    (norm,) = collect(BatchLoader(data, 4, shuffle=False, normalize=((1.0,), (2.0,))))
    torch.testing.assert_close(norm.x, (data.x - 1) / 2)
    with pytest.raises(ConfigError, match="channels"):
        collect(BatchLoader(image_data(2), 2, normalize=((0.0, 0.0), (1.0, 1.0))))


def test_bundle_loader_uses_info_normalisation() -> None:
    data = image_data(4)
    info = DatasetInfo("toy", 4, (3, 6, 6), mean=(0.5,) * 3, std=(0.5,) * 3)
    (batch,) = collect(DataBundle(data, data, info).loader("test", 4, shuffle=False))
    torch.testing.assert_close(batch.x, data.x.float() / 255 * 2 - 1)


class PairDataset(Dataset):
    """A plain map-style dataset returning (x, y) tuples."""

    def __init__(self, data: TensorData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.data.x[i], int(self.data.y[i])


def test_generic_dataset_path_matches_tensor_path() -> None:
    data = image_data(13)
    kwargs = dict(seed=2, augment=Augment(hflip=True, crop_padding=1), normalize=((0.5,), (0.2,)))
    for rank in (0, 1):
        fast = BatchLoader(data, 4, rank=rank, world_size=2, **kwargs)
        slow = BatchLoader(PairDataset(data), 4, rank=rank, world_size=2, **kwargs)
        assert_same_batches(collect(slow), collect(fast))
        assert_same_batches(list(slow.iter_from(2)), collect(fast)[2:])
    tiny = [collect(BatchLoader(PairDataset(float_data(3)), 4, rank=r, world_size=4))[-1] for r in range(4)]
    assert [len(b) for b in tiny] == [1, 1, 1, 0] and tiny[3].x.shape == (0, 5)


# ---------------------------------------------------------------- augmentation


def test_augment_reproducible_and_shape_preserving() -> None:
    aug = Augment(hflip=True, crop_padding=4, shift=2, noise=0.1)
    x = torch.rand(16, 3, 8, 8)
    params = aug.draw(16, torch.Generator().manual_seed(0), (3, 8, 8))
    again = aug.draw(16, torch.Generator().manual_seed(0), (3, 8, 8))
    assert params.keys() == {"flip", "crop", "shift", "noise"}
    assert all(torch.equal(params[k], again[k]) for k in params)
    out = aug.apply(x, params)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, aug.apply(x, again))
    # applying a slice equals slicing the applied batch (what ranks rely on)
    torch.testing.assert_close(aug.apply(x[4:8], slice_params(params, 4, 8)), out[4:8], rtol=0, atol=0)
    other = aug.draw(16, torch.Generator().manual_seed(1), (3, 8, 8))
    assert not torch.equal(aug.apply(x, other), out)
    for shape in [(16, 40), (16, 2, 40)]:  # 1-D signals
        y = torch.rand(shape)
        assert aug.apply(y, aug.draw(16, torch.Generator().manual_seed(0), shape[1:])).shape == shape


def test_translation_flip_and_crop_semantics() -> None:
    aug = Augment(hflip=True, crop_padding=1, shift=3)
    signal = torch.arange(1.0, 7.0).repeat(2, 1)  # (2, 6)
    shifted = aug.apply(signal, {"shift": torch.tensor([[0, 2], [0, -3]])})
    assert shifted.tolist() == [[0, 0, 1, 2, 3, 4], [4, 5, 6, 0, 0, 0]]
    flipped = aug.apply(signal, {"flip": torch.tensor([True, False])})
    assert flipped.tolist() == [[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]]
    image = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    cropped = aug.apply(image, {"crop": torch.tensor([[1, -1]])})  # down one row, left one column
    assert cropped[0, 0].tolist() == [[0, 0, 0], [2, 3, 0], [5, 6, 0]]


def test_augment_config_validation() -> None:
    assert Augment.from_config(None) is None
    assert Augment.from_config({"crop_padding": 4, "hflip": True}) == Augment(hflip=True, crop_padding=4)
    assert not Augment().enabled and Augment(noise=0.1).enabled
    with pytest.raises(ConfigError, match="crop_padding"):
        Augment(crop_padding=-1)
    with pytest.raises(ConfigError, match=r"data\.augment\.shfit.*'shift'"):
        Augment.from_config({"shfit": 2})


def test_loader_augmentation_varies_by_batch_and_epoch() -> None:
    data = TensorData(torch.ones(8, 1, 4, 4, dtype=torch.uint8) * 255, torch.zeros(8, dtype=torch.int64))
    loader = BatchLoader(data, 8, shuffle=False, augment={"crop_padding": 2})
    first = collect(loader)[0].x
    assert first.shape == (8, 1, 4, 4)
    assert not torch.equal(first, torch.ones_like(first))  # zero padding got in
    assert torch.equal(collect(loader)[0].x, first)  # same epoch: same views
    loader.set_epoch(1)
    assert not torch.equal(collect(loader)[0].x, first)


def test_augment_params_replay_a_rank_batch() -> None:
    data = image_data(10)
    aug = Augment(hflip=True, crop_padding=2, noise=0.1)
    loader = BatchLoader(data, 4, seed=9, rank=1, world_size=2, augment=aug)
    loader.set_epoch(3)
    batches = collect(loader)
    k = 2  # the last, partial global batch (2 samples, one per rank)
    params = loader.augment_params(k)
    assert params is not None and params["flip"].shape == (2,)
    lo, hi = rank_bounds(2, 1, 2)
    replay = aug.apply(data.x[batches[k].idx].float() / 255, slice_params(params, lo, hi))
    torch.testing.assert_close(replay, batches[k].x, rtol=0, atol=0)
    assert BatchLoader(data, 4).augment_params(0) is None


def test_small_tensor_data_is_indexed_on_the_accelerator_large_stays_on_the_host() -> None:
    data = float_data(64, 8)  # 2 KiB of inputs
    assert not BatchLoader(data, 8).data_on_device()  # a CPU loader indexes on the CPU
    assert BatchLoader(data, 8, device="cuda").data_on_device()
    assert not BatchLoader(data, 8, device="cuda", device_data_mb=0).data_on_device()
    assert not BatchLoader(data, 8, device="cuda", device_data_mb=data.nbytes / 2**20 / 2).data_on_device()
    assert BatchLoader(data, 8, device="cuda", device_data_mb=1.5).variant(shuffle=False).device_data_mb == 1.5
    assert data.nbytes == 64 * 8 * 4 + 64 * 8
    x, y = data.on(torch.device("cpu"))
    assert x is data.x and y is data.y  # already there: no copy
