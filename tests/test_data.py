"""Tests of the dataset layer: registry, built-in datasets, on-disk readers, bundles."""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from darkknowledge.data import (
    UNLABELED,
    DataBundle,
    DataFormatError,
    DatasetInfo,
    TensorData,
    cache_dir,
    list_datasets,
    load_dataset,
)
from darkknowledge.data.cache import save_npz_atomic
from darkknowledge.data.seeds import TRANSFER_STREAM, derive_seed
from darkknowledge.data.sources import mnist1d_generated
from darkknowledge.errors import ConfigError, RegistryError

SMALL = 200  # mnist1d samples per test: 160 train / 40 test, generated in ~0.15 s


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache directory."""
    cache = tmp_path / "dk-cache"
    monkeypatch.setenv("DK_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------- registry and params


def test_builtin_datasets_registered() -> None:
    assert {"mnist1d", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "image_folder"} <= set(
        list_datasets()
    )


def test_cache_dir_env(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir() == tmp_cache
    monkeypatch.delenv("DK_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "darkknowledge"


def test_unknown_dataset_suggests_close_names() -> None:
    with pytest.raises(RegistryError, match="mnist1d") as info:
        load_dataset("mnist_1d")
    assert "unknown dataset 'mnist_1d'" in str(info.value)


def test_unknown_param_names_path_and_close_match() -> None:
    with pytest.raises(ConfigError, match=r"data\.params\.num_sample: unknown parameter.*'num_samples'"):
        load_dataset("mnist1d", num_sample=100)


def test_framework_args_are_not_params() -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("digits", tset_fraction=0.1)
    message = str(info.value)
    assert "Did you mean 'test_fraction'?" in message
    assert message.endswith("Valid parameters: test_fraction.")  # root/split_seed are not user params


def test_bad_param_type_and_range() -> None:
    with pytest.raises(ConfigError, match=r"data\.params\.num_samples"):
        load_dataset("mnist1d", num_samples="many")
    with pytest.raises(ConfigError, match=r"data\.params\.num_samples"):
        load_dataset("mnist1d", num_samples=5)
    with pytest.raises(ConfigError, match=r"data\.params\.test_fraction"):
        load_dataset("digits", test_fraction=1.5)
    with pytest.raises(ConfigError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.0)


# ---------------------------------------------------------------- mnist1d


def test_mnist1d_shapes_classes_and_package_equality() -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    bundle = load_dataset("mnist1d", num_samples=SMALL)
    assert bundle.info.name == "mnist1d" and bundle.info.num_classes == 10
    assert bundle.info.input_shape == (40,)
    assert bundle.info.mean is None and len(bundle.info.fingerprint) == 16
    assert bundle.train.x.shape == (160, 40) and bundle.test.x.shape == (40, 40)
    assert bundle.train.x.dtype == torch.float32 and bundle.train.y.dtype == torch.int64
    assert set(bundle.train.y.tolist()) == set(range(10))
    assert bundle.transfer is None and bundle.val is None

    args = get_dataset_args()
    args.num_samples = SMALL
    ref = make_dataset(args)  # the package's own generator (offline)
    np.testing.assert_array_equal(bundle.train.x.numpy(), ref["x"].astype(np.float32))
    np.testing.assert_array_equal(bundle.train.y.numpy(), ref["y"])
    np.testing.assert_array_equal(bundle.test.x.numpy(), ref["x_test"].astype(np.float32))
    np.testing.assert_array_equal(bundle.test.y.numpy(), ref["y_test"])


def test_mnist1d_default_split_sizes_follow_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """5000 -> 4000/1000, checked without generating 5000 samples."""
    calls = []

    def fake_raw(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append((n, seed))
        rng = np.random.default_rng(seed)
        return rng.normal(size=(n, 40)), np.arange(n) % 10

    monkeypatch.setattr(mnist1d_generated, "generate_raw", fake_raw)
    bundle = load_dataset("mnist1d")
    assert (len(bundle.train), len(bundle.test)) == (4000, 1000)
    assert calls == [(5000, 42)]


def test_mnist1d_deterministic_cached_and_rng_untouched(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.random.seed(123)
    expected_draw = np.random.rand()
    np.random.seed(123)
    first = load_dataset("mnist1d", num_samples=SMALL)
    assert np.random.rand() == expected_draw  # generation restored numpy's global RNG

    files = sorted((tmp_cache / "data").iterdir())
    assert [f.name.startswith("mnist1d-") and f.suffix == ".npz" for f in files] == [True]

    def no_generation(*_: object) -> None:
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(mnist1d_generated, "generate_raw", no_generation)
    second = load_dataset("mnist1d", num_samples=SMALL)
    assert torch.equal(first.train.x, second.train.x) and torch.equal(first.test.y, second.test.y)
    assert first.info.fingerprint == second.info.fingerprint
    assert not [f for f in (tmp_cache / "data").iterdir() if f.name.endswith(".tmp")]


def test_mnist1d_seed_changes_data_and_fingerprint() -> None:
    a = load_dataset("mnist1d", num_samples=SMALL, seed=1)
    b = load_dataset("mnist1d", num_samples=SMALL, seed=2)
    assert not torch.equal(a.train.x, b.train.x)
    assert a.info.fingerprint != b.info.fingerprint


def test_mnist1d_corrupt_cache_is_regenerated(tmp_cache: Path) -> None:
    first = load_dataset("mnist1d", num_samples=SMALL)
    (path,) = (tmp_cache / "data").iterdir()
    path.write_bytes(b"not a zip file")
    again = load_dataset("mnist1d", num_samples=SMALL)
    assert torch.equal(first.train.x, again.train.x)


def test_mnist1d_transfer_unlabeled_and_normalised_with_train_stats() -> None:
    bundle = load_dataset("mnist1d", num_samples=SMALL, transfer_samples=25)
    transfer = bundle.transfer
    assert isinstance(transfer, TensorData)
    assert transfer.x.shape == (25, 40) and transfer.x.dtype == torch.float32
    assert (transfer.y == UNLABELED).all() and transfer.num_labeled == 0

    raw_main, _ = mnist1d_generated.generate_raw(SMALL, 42)
    mean, std = raw_main.mean(), raw_main.std()  # the affine map the train split went through
    raw_transfer, _ = mnist1d_generated.generate_raw(30, derive_seed(42, TRANSFER_STREAM) % 2**32)
    np.testing.assert_allclose(transfer.x.numpy(), (raw_transfer[:25] - mean) / std, rtol=1e-5, atol=1e-6)
    # a different seed: no transfer sample equals a training sample
    assert torch.cdist(transfer.x, bundle.train.x).min() > 1e-3
    # the main split does not change when transfer samples are added
    plain = load_dataset("mnist1d", num_samples=SMALL)
    assert torch.equal(plain.train.x, bundle.train.x)
    assert plain.info.fingerprint != bundle.info.fingerprint
    assert "25 unlabeled" in bundle.describe()


# ---------------------------------------------------------------- digits, val split, bundle


def test_digits_shapes_split_and_standardisation() -> None:
    bundle = load_dataset("digits")
    assert bundle.info.input_shape == (1, 8, 8) and bundle.info.num_classes == 10
    assert len(bundle.train) + len(bundle.test) == 1797
    assert abs(len(bundle.test) - 0.2 * 1797) <= 10
    counts = torch.bincount(bundle.test.y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # about 20% of each class (~180)
    assert bundle.train.x.dtype == torch.float32
    assert abs(float(bundle.train.x.mean())) < 1e-4 and abs(float(bundle.train.x.std()) - 1) < 1e-3

    same = load_dataset("digits")
    other = load_dataset("digits", split_seed=1)
    assert torch.equal(same.test.x, bundle.test.x)
    assert not torch.equal(other.test.y, bundle.test.y)
    assert other.info.fingerprint != bundle.info.fingerprint


def test_val_fraction_is_deterministic_and_disjoint() -> None:
    full = load_dataset("digits")
    a = load_dataset("digits", val_fraction=0.25)
    b = load_dataset("digits", val_fraction=0.25)
    c = load_dataset("digits", val_fraction=0.25, split_seed=3)
    assert len(a.val) == round(0.25 * len(full.train))
    assert len(a.train) + len(a.val) == len(full.train)
    assert torch.equal(a.val.x, b.val.x)
    assert not torch.equal(a.val.y, c.val.y) or not torch.equal(a.val.x, c.val.x)
    # the split rows are rows of the full training set, none of them shared
    rows = {tuple(r.flatten().tolist()) for r in full.train.x}
    val_rows = {tuple(r.flatten().tolist()) for r in a.val.x}
    train_rows = {tuple(r.flatten().tolist()) for r in a.train.x}
    assert val_rows <= rows and train_rows <= rows
    assert a.info.fingerprint != full.info.fingerprint


def test_random_split_partitions_indices() -> None:
    from darkknowledge.data.splits import random_split

    keep, held = random_split(50, 0.3, seed=4)
    assert held.numel() == 15 and keep.numel() == 35
    assert sorted(torch.cat([keep, held]).tolist()) == list(range(50))
    again_keep, again_held = random_split(50, 0.3, seed=4)
    assert torch.equal(held, again_held) and torch.equal(keep, again_keep)
    assert not torch.equal(random_split(50, 0.3, seed=5)[1], held)


def test_tensor_data_validation_and_bundle_helpers() -> None:
    with pytest.raises(ConfigError):
        TensorData(torch.zeros(3, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ConfigError):
        TensorData(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ConfigError):
        TensorData(torch.zeros(3, 2), torch.tensor([0, -2, 1]))
    data = TensorData(torch.arange(6.0).view(3, 2), torch.tensor([1, UNLABELED, 0], dtype=torch.int32))
    assert data.y.dtype == torch.int64 and data.num_labeled == 2
    assert torch.equal(data.subset(torch.tensor([2, 0])).x, torch.tensor([[4.0, 5.0], [0.0, 1.0]]))
    bundle = DataBundle(data, data, DatasetInfo("toy", 2, (2,), mean=(0.5,), std=(2.0,)))
    assert bundle.info.normalization == ((0.5,), (2.0,))
    with pytest.raises(ConfigError, match="no val split"):
        bundle.split("val")
    assert "toy" in bundle.describe() and "0.5000" in bundle.describe()


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX as published: magic 0x0000 0x08 ndim, big-endian uint32 dims, then uint8 data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def make_mnist_files(raw: Path, n_train: int = 12, n_test: int = 5, gz: bool = False, seed: int = 0) -> dict:
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(raw / (name + (".gz" if gz else "")), array)
    return arrays


def test_idx_magic_numbers_written_as_published(tmp_path: Path) -> None:
    write_idx(tmp_path / "img", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "lbl", np.zeros(2, np.uint8))
    assert (tmp_path / "img").read_bytes()[:4] == bytes.fromhex("00000803")  # 2051
    assert (tmp_path / "lbl").read_bytes()[:4] == bytes.fromhex("00000801")  # 2049


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_datasets_read_back(tmp_path: Path, name: str, folder: str, gz: bool) -> None:
    arrays = make_mnist_files(tmp_path / folder / "raw", gz=gz)
    bundle = load_dataset(name, root=tmp_path)
    assert bundle.info.input_shape == (1, 28, 28) and bundle.info.num_classes == 10
    assert bundle.train.x.dtype == torch.uint8 and bundle.train.x.shape == (12, 1, 28, 28)
    np.testing.assert_array_equal(bundle.train.x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(bundle.train.y.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(bundle.test.x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(bundle.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    pixels = arrays["train-images-idx3-ubyte"] / 255.0
    assert bundle.info.mean == pytest.approx((pixels.mean(),))
    assert bundle.info.std == pytest.approx((pixels.std(),))


def test_idx_fingerprint_tracks_file_bytes(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    arrays = make_mnist_files(raw)
    before = load_dataset("mnist", root=tmp_path).info.fingerprint
    assert load_dataset("mnist", root=tmp_path).info.fingerprint == before
    changed = arrays["t10k-images-idx3-ubyte"].copy()
    changed[0, 0, 0] ^= 1
    write_idx(raw / "t10k-images-idx3-ubyte", changed)
    assert load_dataset("mnist", root=tmp_path).info.fingerprint != before


def test_idx_bad_magic_and_size(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    make_mnist_files(raw)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 12) + bytes(12))
    with pytest.raises(DataFormatError, match="not an IDX file"):
        load_dataset("mnist", root=tmp_path)
    (raw / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, 12) + bytes(11))
    with pytest.raises(DataFormatError, match="header says"):
        load_dataset("mnist", root=tmp_path)


def test_missing_files_error_names_path_and_remedies(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "download=True" in message
    assert 'pip install "darkknowledge[vision]"' in message
    with pytest.raises(ConfigError, match="data_batch_1.*cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path)


def test_download_without_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ConfigError, match=r'needs torchvision.*pip install "darkknowledge\[vision\]"'):
        load_dataset("fashion_mnist", root=tmp_path, download=True)


def test_download_uses_torchvision_then_own_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            make_mnist_files(Path(root) / "MNIST" / "raw", gz=True)

    tv = types.ModuleType("torchvision")
    tv_datasets = types.ModuleType("torchvision.datasets")
    tv_datasets.MNIST = FakeMNIST  # type: ignore[attr-defined]
    tv.datasets = tv_datasets  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", tv_datasets)
    bundle = load_dataset("mnist", root=tmp_path, download=True)
    assert len(bundle.train) == 12 and calls[0] == (str(tmp_path), True, True)
    calls.clear()
    load_dataset("mnist", root=tmp_path, download=True)  # files present: no download
    assert calls == []


# ---------------------------------------------------------------- CIFAR


def cifar_batch(rng: np.random.Generator, n: int, label_key: bytes, classes: int) -> dict:
    return {
        b"batch_label": b"fake batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, classes, n).tolist(),
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }


def test_cifar10_read_back_values_and_channel_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = [cifar_batch(rng, 3, b"labels", 10) for _ in range(6)]
    batches[0][b"data"][0] = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)])
    for i, batch in enumerate(batches[:5], start=1):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(batches[5]))
    bundle = load_dataset("cifar10", root=tmp_path)
    assert bundle.train.x.shape == (15, 3, 32, 32) and bundle.train.x.dtype == torch.uint8
    assert bundle.info.input_shape == (3, 32, 32) and bundle.info.num_classes == 10
    assert bundle.train.x[0, :, 5, 7].tolist() == [10, 20, 30]  # R, G, B planes
    expected = np.concatenate([b[b"data"] for b in batches[:5]]).reshape(15, 3, 32, 32)
    np.testing.assert_array_equal(bundle.train.x.numpy(), expected)
    assert bundle.train.y.tolist() == sum((b[b"labels"] for b in batches[:5]), [])
    assert bundle.test.y.tolist() == batches[5][b"labels"]
    assert len(bundle.info.mean) == 3


def test_cifar100_fine_labels_str_keys_and_old_numpy_module(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    train = cifar_batch(rng, 4, b"fine_labels", 100)
    test = {k.decode(): v for k, v in cifar_batch(rng, 2, b"fine_labels", 100).items()}  # str keys
    blob = pickle.dumps(train, protocol=2)
    if b"numpy._core" in blob:  # mimic the originals, pickled before numpy 2 renamed numpy.core
        blob = blob.replace(b"numpy._core", b"numpy.core")
    (folder / "train").write_bytes(blob)
    (folder / "test").write_bytes(pickle.dumps(test))
    bundle = load_dataset("cifar100", root=tmp_path)
    assert bundle.info.num_classes == 100
    assert bundle.train.y.tolist() == train[b"fine_labels"]
    assert bundle.test.y.tolist() == test["fine_labels"]
    np.testing.assert_array_equal(bundle.train.x.reshape(4, -1).numpy(), train[b"data"])


def test_cifar_refuses_code_in_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    (folder / "train").write_bytes(pickle.dumps({b"data": Evil(), b"fine_labels": []}))
    (folder / "test").write_bytes(pickle.dumps({b"data": Evil(), b"fine_labels": []}))
    with pytest.raises(DataFormatError, match="refusing to unpickle"):
        load_dataset("cifar100", root=tmp_path)


# ---------------------------------------------------------------- image folder


def make_image_folder(root: Path, splits: tuple[str, ...] = ("train", "test"), size: int = 4) -> dict:
    Image = pytest.importorskip("PIL.Image")  # pillow is part of the [vision] extra

    colours = {"cat": (255, 0, 0), "ant": (0, 255, 0), "bee": (0, 0, 255)}
    for split in splits:
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = np.zeros((size, size, 3), np.uint8)
                pixels[...] = colour
                pixels[0, 0] = (i, i, i)  # make the two images distinguishable
                Image.fromarray(pixels).save(folder / f"img{i}.png")
            (folder / "notes.txt").write_text("not an image")
    return colours


def test_image_folder_read_back(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    bundle = load_dataset("image_folder", root=tmp_path, image_size=4)
    assert bundle.info.class_names == ("ant", "bee", "cat")  # alphabetical
    assert bundle.info.input_shape == (3, 4, 4) and bundle.info.num_classes == 3
    assert bundle.train.x.dtype == torch.uint8 and len(bundle.train) == 6 and len(bundle.test) == 6
    assert bundle.train.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert bundle.train.x[0, :, 1, 1].tolist() == [0, 255, 0]  # ant is green
    assert bundle.train.x[4, :, 2, 3].tolist() == [255, 0, 0]  # cat is red
    assert bundle.train.x[5, :, 0, 0].tolist() == [1, 1, 1]  # img1's marked pixel
    assert bundle.val is None


def test_image_folder_resize_val_and_errors(tmp_path: Path) -> None:
    make_image_folder(tmp_path, splits=("train", "test", "val"), size=6)
    bundle = load_dataset("image_folder", root=tmp_path, image_size=3)
    assert bundle.train.x.shape == (6, 3, 3, 3) and bundle.val is not None and len(bundle.val) == 6
    with pytest.raises(ConfigError, match="already has a validation split"):
        load_dataset("image_folder", root=tmp_path, image_size=3, val_fraction=0.2)
    with pytest.raises(ConfigError, match=r"no directory .*train.*Expected <root>/train/<class>"):
        load_dataset("image_folder", root=tmp_path / "nowhere")
    (tmp_path / "test" / "dog").mkdir()
    with pytest.raises(ConfigError, match="dog"):
        load_dataset("image_folder", root=tmp_path)


def test_save_npz_atomic_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.npz"
    save_npz_atomic(path, x=np.arange(3))
    save_npz_atomic(path, x=np.arange(4))
    with np.load(path) as npz:
        assert npz["x"].tolist() == [0, 1, 2, 3]
    assert [p.name for p in path.parent.iterdir()] == ["a.npz"]


def test_image_folder_without_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ConfigError, match=r'needs pillow.*pip install "darkknowledge\[vision\]"'):
        load_dataset("image_folder", root=tmp_path)
