"""The contract of every registered dataset, run through the ``example`` its file registers:
shapes, dtypes, label range, determinism, and a fingerprint that follows the data."""

from __future__ import annotations

import pytest
import torch

from darkknowledge.data import DATASETS, TensorData, load_dataset
from darkknowledge.errors import ConfigError


def example(name: str, root, variant: int = 0) -> dict:
    make = getattr(DATASETS.get(name), "example", None)
    assert make is not None, f"dataset {name!r} registers no example (register_dataset(name, example=...))"
    try:
        return make(root, variant)
    except ConfigError as exc:  # e.g. pillow missing for image files
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_contract(name, tmp_path):
    params = example(name, tmp_path / "a")
    bundle = load_dataset(name, root=tmp_path / "a", val_fraction=0.25, **params)
    info = bundle.info
    assert info.num_classes >= 2 and info.fingerprint
    for split in ("train", "val", "test", "transfer"):
        data = getattr(bundle, split)
        if data is None:
            continue
        assert isinstance(data, TensorData) and len(data) > 0, split
        assert tuple(data.x.shape[1:]) == tuple(info.input_shape), split
        assert data.x.dtype in (torch.uint8, torch.float32), split
        assert data.y.dtype == torch.int64, split
        low = -1 if split == "transfer" else 0  # a transfer set may be unlabelled
        assert int(data.y.min()) >= low and int(data.y.max()) < info.num_classes, split
    assert bundle.val is not None and len(bundle.val) > 0
    if info.mean is not None:
        assert len(info.mean) == len(info.std) and all(s > 0 for s in info.std)

    again = load_dataset(name, root=tmp_path / "a", val_fraction=0.25, **params)  # deterministic
    assert again.info.fingerprint == info.fingerprint
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(again, split).x, getattr(bundle, split).x)
        assert torch.equal(getattr(again, split).y, getattr(bundle, split).y)

    other = load_dataset(name, root=tmp_path / "b", val_fraction=0.25, **example(name, tmp_path / "b", 1))
    assert other.info.fingerprint != info.fingerprint  # other data: another fingerprint
    assert load_dataset(name, root=tmp_path / "a", val_fraction=0.5, **params).info.fingerprint != info.fingerprint
