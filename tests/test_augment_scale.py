"""``data.augment.scale``: a per-sample amplitude factor, drawn like the other augmentation parameters."""

import pytest
import torch

from darkknowledge.config import load_config
from darkknowledge.data import Augment, BatchLoader, TensorData
from darkknowledge.errors import ConfigError


def signals(n: int = 30, length: int = 12) -> TensorData:
    x = torch.randn(n, length, generator=torch.Generator().manual_seed(4))
    return TensorData(x, torch.arange(n) % 3)


def test_each_sample_is_scaled_by_its_own_factor_in_range() -> None:
    aug = Augment(scale=0.3)
    params = aug.draw(500, torch.Generator().manual_seed(0))
    factor = params["scale"]  # (500,)
    assert set(params) == {"scale"} and factor.shape == (500,)
    assert float(factor.min()) >= 0.7 and float(factor.max()) <= 1.3
    assert float(factor.min()) < 0.75 and float(factor.max()) > 1.25  # the whole range is used
    x = torch.randn(500, 2, 7)
    out = aug.apply(x, params)
    torch.testing.assert_close(out, x * factor.view(-1, 1, 1))


def test_scale_draws_leave_the_other_transforms_draws_as_they_were() -> None:
    before = Augment(shift=2, noise=0.1).draw(8, torch.Generator().manual_seed(3), (12,))
    after = Augment(shift=2, noise=0.1, scale=0.2).draw(8, torch.Generator().manual_seed(3), (12,))
    assert torch.equal(before["shift"], after["shift"]) and torch.equal(before["noise"], after["noise"])


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_see_the_single_process_factors(world_size: int) -> None:
    kwargs = dict(seed=7, augment={"scale": 0.25, "shift": 1})
    single = BatchLoader(signals(), 6, **kwargs)
    ranks = [BatchLoader(signals(), 6, rank=r, world_size=world_size, **kwargs) for r in range(world_size)]
    for epoch in (0, 1):
        for loader in [single, *ranks]:
            loader.set_epoch(epoch)
        expected = list(single)
        per_rank = [list(loader) for loader in ranks]
        for k, batch in enumerate(expected):
            joined = torch.cat([batches[k].x for batches in per_rank])
            torch.testing.assert_close(joined, batch.x, rtol=0, atol=0)
    plain = BatchLoader(signals(), 6, seed=7, augment={"shift": 1})
    plain.set_epoch(1)
    assert not torch.equal(next(iter(plain)).x, expected[0].x)  # the factors change the batch


def test_scale_is_validated() -> None:
    assert load_config(None, ["data.augment.scale=0.2"]).data.augment.enabled()
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match="data.augment.scale"):
            load_config(None, [f"data.augment.scale={bad}"])
    with pytest.raises(ConfigError, match=r"data.augment.scale: must be in \[0, 1\)"):
        Augment(scale=1.5)


def test_cached_views_replay_the_stored_factors(tmp_path) -> None:
    from darkknowledge.models import create_model
    from darkknowledge.teachers.cache import CacheSpec, load_or_build
    from darkknowledge.teachers.frozen import FrozenTeacher

    gen = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(64, 1, 40, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    torch.manual_seed(0)
    teacher = FrozenTeacher(create_model("cnn1d", num_classes=10, input_shape=(1, 40), channels=8))
    aug = Augment(scale=0.4, shift=2)
    train = BatchLoader(data, 16, shuffle=True, augment=aug, seed=3)
    spec = CacheSpec(logits=True, views=2, dtype="fp32")
    cache = load_or_build(teacher, train, spec, augment=aug, seed=1, memory_limit_mb=9, root=tmp_path)
    train.replay = cache.replay(train.seed)
    train.set_epoch(1)
    for batch in train:
        stored = cache.view_params(batch.idx, batch.view)
        assert "scale" in stored and float((stored["scale"] - 1).abs().max()) > 0
        torch.testing.assert_close(batch.x, aug.apply(data.x[batch.idx], stored))
        out = cache.outputs(batch.idx, batch.view, batch.x.device).logits
        torch.testing.assert_close(out, teacher(batch.x).logits, atol=1e-5, rtol=1e-5)
