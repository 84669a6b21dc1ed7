"""Tests of the model zoo: every registered model, the registry API and external models (with stand-ins
for the libraries; the real torchvision, timm and transformers models: tests/test_external_models.py)."""

from __future__ import annotations

import copy
import io
import json
import sys
import types

import pytest
import torch
from torch import nn

from darkknowledge.errors import ConfigError, RegistryError
from darkknowledge.models import (
    MODELS,
    count_params,
    create_model,
    default_taps,
    list_models,
    register_model,
)

# Per-sample input shapes to try for each model; models not listed get a CIFAR-sized image.
INPUT_SHAPES: dict[str, list[tuple[int, ...]]] = {
    "mlp": [(40,), (3, 32, 32)],
    "cnn1d": [(40,), (2, 40)],
    "dscnn1d": [(40,), (2, 40)],
    "cnn2d": [(3, 32, 32), (1, 8, 8), (1, 28, 28)],
    "resnet8": [(3, 32, 32), (1, 8, 8)],
    "wrn_16_1": [(3, 32, 32), (1, 8, 8)],
}
DEFAULT_SHAPE = (3, 32, 32)
# Big models: a smaller image keeps the forward/backward quick (adaptive pooling makes it fit).
HEAVY = {"wrn_28_10": (3, 16, 16), "resnet32x4": (3, 16, 16), "resnet110": (3, 16, 16)}

CASES = [
    pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}")
    for name in list_models()
    for shape in INPUT_SHAPES.get(name, [HEAVY.get(name, DEFAULT_SHAPE)])
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: fastest in one thread


def _build(name: str, shape: tuple[int, ...], num_classes: int = 7, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=num_classes, input_shape=shape)


def test_zoo_is_registered() -> None:
    names = list_models()
    for expected in ("mlp", "cnn1d", "cnn2d", "resnet20", "resnet8x4", "resnet32x4", "wrn", "wrn_40_2"):
        assert expected in names
    assert names == sorted(names)
    assert list_models("resnet*x4") == ["resnet32x4", "resnet8x4"]
    assert list_models("nothing*") == []


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_zoo_model_contract(name: str, shape: tuple[int, ...]) -> None:
    model = _build(name, shape)
    again = _build(name, shape)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2
        assert torch.equal(a, b), f"{name}: {k} differs between two builds with the same seed"
    del again
    batch = 2
    x = torch.randn(batch, *shape)  # (B, *input_shape)

    taps = model.feature_taps()
    modules = dict(model.named_modules())
    assert taps, f"{name} lists no feature taps"
    for tap in taps:
        assert tap in modules, f"{name}: tap {tap!r} is not a module path"
    assert isinstance(modules.get("fc"), nn.Linear), "the classifier must be 'fc' ('fc:input' = penultimate)"
    assert default_taps(model) == taps

    captured: dict[str, torch.Tensor] = {}
    handles = [modules[t].register_forward_hook(lambda m, i, o, t=t: captured.__setitem__(t, o)) for t in taps]
    handles.append(modules["fc"].register_forward_hook(lambda m, i, o: captured.__setitem__("fc:input", i[0])))
    model.train()
    logits = model(x)
    for h in handles:
        h.remove()

    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (batch, 7)
    assert list(captured) == [*taps, "fc:input"]
    assert all(isinstance(v, torch.Tensor) and v.shape[0] == batch for v in captured.values())
    assert captured["fc:input"].dim() == 2 and captured["fc:input"].shape[1] == modules["fc"].in_features

    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)

    assert model.dk_name == name
    assert model.dk_params == {"num_classes": 7, "input_shape": list(shape)}
    json.dumps(model.dk_params)


@pytest.mark.parametrize(
    ("name", "millions"),
    [
        ("resnet20", 0.28),
        ("resnet56", 0.86),
        ("resnet110", 1.74),
        ("resnet8x4", 1.23),
        ("resnet32x4", 7.43),
        ("wrn_40_2", 2.26),
        ("wrn_16_2", 0.70),
        ("wrn_40_1", 0.57),
    ],
)
def test_param_counts_match_repdistiller(name: str, millions: float) -> None:
    model = create_model(name, num_classes=100, input_shape=(3, 32, 32))
    n = count_params(model)
    assert abs(n / 1e6 - millions) / millions < 0.02, f"{name}: {n} params"


def test_count_params_trainable_only() -> None:
    model = create_model("mlp", num_classes=3, input_shape=(4,), hidden=(5,))
    assert count_params(model) == (4 * 5 + 5) + (5 * 3 + 3)
    model.fc.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 4 * 5 + 5


def test_resnet_module_names_and_eval_mode() -> None:
    model = create_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
    top = [n for n, _ in model.named_children()]
    assert top == ["conv1", "bn1", "relu", "layer1", "layer2", "layer3", "avgpool", "fc"]
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [3, 3, 3]
    assert default_taps(model) == ["layer1", "layer2", "layer3"]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_no_inplace_ops_in_zoo() -> None:
    for name in ("resnet8", "wrn_16_1", "cnn2d", "cnn1d", "mlp"):
        for m in create_model(name).modules():
            assert not getattr(m, "inplace", False), f"{name}: {m} is in-place"


def test_cnn1d_accepts_2d_and_3d_batches() -> None:
    model = create_model("cnn1d", num_classes=10, input_shape=(40,))
    assert model(torch.randn(4, 40)).shape == (4, 10)  # (B, L)
    assert model(torch.randn(4, 1, 40)).shape == (4, 10)  # (B, 1, L)


def test_wrn_generic_builder_and_bad_depth() -> None:
    model = create_model("wrn", depth=10, widen=1, num_classes=5, input_shape=(3, 8, 8))
    assert len(model.block1.layer) == 1
    with pytest.raises(ConfigError, match=r"depth.*6n \+ 4.*18"):
        create_model("wrn", depth=18)


def test_unknown_model_lists_close_names() -> None:
    with pytest.raises(RegistryError, match="resnet20"):
        create_model("resnet2")


def test_unknown_kwarg_is_config_error() -> None:
    with pytest.raises(ConfigError, match="hiden") as info:
        create_model("mlp", hiden=(10,))
    assert "hidden" in str(info.value)  # suggests the right spelling


@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("mlp", {"num_classes": "ten"}, "num_classes"),
        ("mlp", {"hidden": "wide"}, "hidden"),
        ("mlp", {"dropout": 1.5}, "dropout"),
        ("mlp", {"activation": "swish"}, "activation"),
        ("cnn2d", {"batch_norm": "maybe"}, "batch_norm"),
        ("cnn1d", {"depth": 0}, "depth"),
        ("resnet20", {"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_values_are_config_errors(name: str, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        create_model(name, **kwargs)


def test_bad_input_shape_is_config_error() -> None:
    with pytest.raises(ConfigError, match="input_shape"):
        create_model("resnet20", input_shape=(40,))
    with pytest.raises(ConfigError, match="input_shape"):
        create_model("cnn1d", input_shape=(3, 32, 32))
    with pytest.raises(ConfigError, match="input_shape"):
        create_model("cnn2d", input_shape=(0, 8, 8))
    short = create_model("cnn1d", input_shape=(2,), depth=5)  # lengths never drop below 1
    assert short(torch.randn(3, 2)).shape == (3, 10)


def test_kwargs_are_coerced_and_dk_params_rebuild_the_model() -> None:
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=4, input_shape=[6], hidden=[8, 8], dropout=0.1)
    assert model.dk_name == "mlp"
    assert model.dk_params == {"num_classes": 4, "input_shape": [6], "hidden": [8, 8], "dropout": 0.1}
    config = json.loads(json.dumps({"name": model.dk_name, "params": model.dk_params}))
    torch.manual_seed(0)
    rebuilt = create_model(config["name"], **config["params"])
    for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_default_taps_on_wrapped_and_plain_modules() -> None:
    model = create_model("resnet8")
    wrapped = nn.DataParallel(model)
    taps = default_taps(wrapped)
    assert taps == ["module.layer1", "module.layer2", "module.layer3"]
    assert all(t in dict(wrapped.named_modules()) for t in taps)
    assert default_taps(nn.Linear(2, 2)) == []


def test_register_custom_model() -> None:
    @register_model("tiny_test_net")
    def tiny_test_net(num_classes: int = 3, input_shape: tuple[int, ...] = (4,)) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))

    try:
        model = create_model("tiny_test_net", num_classes=2)
        assert model(torch.randn(5, 4)).shape == (5, 2)
        assert "tiny_test_net" in list_models()
        assert default_taps(model) == []
        assert model.dk_params == {"num_classes": 2}
    finally:
        MODELS._items.pop("tiny_test_net", None)


@pytest.mark.parametrize(("source", "extra"), [("torchvision", "vision"), ("timm", "timm")])
def test_external_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch, source: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, source, None)  # makes `import source` fail
    with pytest.raises(ConfigError, match=rf'pip install "darkknowledge\[{extra}\]"'):
        create_model(f"{source}:resnet18", num_classes=10, input_shape=(3, 32, 32))


def test_external_unknown_source() -> None:
    with pytest.raises(ConfigError, match="torchvision"):
        create_model("torchvison:resnet18")


def test_zoo_models_copy_and_pickle() -> None:
    model = create_model("resnet8", num_classes=3)
    clone = copy.deepcopy(model)  # e.g. an EMA teacher
    assert clone.feature_taps() == model.feature_taps() and clone.dk_params == model.dk_params
    torch.save(model, io.BytesIO())


class _FakeResNet(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1, self.layer2 = nn.Identity(), nn.Identity()
        self.layer3, self.layer4 = nn.Identity(), nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))  # (B, 4, H, W)
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, num_classes)


def test_external_torchvision_path_with_a_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict]] = []

    def get_model(name: str, **kwargs: object) -> nn.Module:
        calls.append((name, kwargs))
        return _FakeResNet(int(kwargs["num_classes"]))  # type: ignore[call-overload]

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(get_model=get_model, list_models=lambda: ["resnet18", "resnet34"])
    monkeypatch.setitem(sys.modules, "torchvision", fake)

    model = create_model("torchvision:resnet18", num_classes=10, input_shape=(3, 32, 32))
    assert calls == [("resnet18", {"weights": None, "num_classes": 10})]  # input_shape dropped
    assert model.dk_name == "torchvision:resnet18"
    assert model.dk_params == {"num_classes": 10, "input_shape": [3, 32, 32]}
    assert default_taps(model) == ["layer1", "layer2", "layer3", "layer4"]
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    with pytest.raises(ConfigError, match="resnet18"):
        create_model("torchvision:resnet19", num_classes=10)


def test_external_timm_path_with_a_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict]] = []

    def create(name: str, **kwargs: object) -> nn.Module:
        calls.append((name, kwargs))
        model = _FakeResNet(int(kwargs["num_classes"]))  # type: ignore[call-overload]
        model.feature_info = [{"module": "conv1"}, {"module": "layer2"}, {"module": "layer4"}]
        return model

    fake = types.ModuleType("timm")
    fake.create_model = create
    fake.is_model = lambda name: name == "resnet18"
    fake.list_models = lambda: ["resnet18"]
    monkeypatch.setitem(sys.modules, "timm", fake)

    model = create_model("timm:resnet18", num_classes=5, input_shape=(1, 28, 28))
    assert calls == [("resnet18", {"pretrained": False, "num_classes": 5, "in_chans": 1})]
    assert default_taps(model) == ["conv1", "layer2", "layer4"]
    with pytest.raises(ConfigError, match="resnet18"):
        create_model("timm:resnet81", num_classes=10)
