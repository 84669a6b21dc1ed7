"""Tests of the CRD benchmark zoo: CIFAR VGG/MobileNetV2/ShuffleNets/ResNet-50 and ImageNet ResNet-18/34.

Expected parameter counts were derived by hand from the source layer definitions, summing
``in/groups * out * k * k`` (+ ``out`` for a conv bias) per conv, ``2 * C`` per BatchNorm and
``in * out + out`` per Linear:

* RepDistiller (HobbitLong/RepDistiller ``models/``) for 100 classes: ``vgg*_bn`` (``vgg.py``,
  convs with bias, five 512-wide blocks at most, ``Linear(512, 100)``), ``mobile_half``
  (``mobilenetv2.py``, T=6, w=0.5, every block with its expansion conv, 1280-wide head),
  ``ShuffleV1`` (``ShuffleNetv1.py``, groups 3, first 1x1 conv ungrouped), ``ShuffleV2``
  (``ShuffleNetv2.py``, net_size 1) and ``ResNet50`` (``resnetv2.py``).
* torchvision's ``resnet18``/``resnet34`` for 1000 classes: 11,689,512 and 21,797,672 (the
  published counts; the same sum gives them), and for 100 classes 513 * 900 fewer.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from darkknowledge.errors import ConfigError
from darkknowledge.losses.feature import pre_activation_tap
from darkknowledge.models import count_params, create_model, default_taps

VGGS = ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")
CIFAR = (*VGGS, "mobilenetv2", "shufflenetv1", "shufflenetv2", "resnet50_cifar")
IMAGENET = ("resnet18", "resnet34")

PARAMS_100 = {
    # vgg8 (1-1-1-1-1 convs): convs+BN 3,913,728 + fc 51,300.
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    # stem 16 ch; blocks 8,12,16,32,48,80,160 ch; head 1x1 160->1280 + BN; fc 1280*100+100.
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,  # fc 960*100+100 = 96,100 of it
    "shufflenetv2": 1_355_528,  # fc 1024*100+100 = 102,500 of it
    "resnet50_cifar": 23_705_252,  # fc 2048*100+100 = 204,900 of it
    "resnet18": 11_227_812,  # 11,689,512 - 513 * 900 (fc 512*1000+1000 -> 512*100+100)
    "resnet34": 21_335_972,
}
PARAMS_1000 = {"resnet18": 11_689_512, "resnet34": 21_797_672}

# Stage taps -> (channels, spatial side) for a 32x32 input (CIFAR) or a 64x64 input (ImageNet).
STAGES = {
    "vgg8": {"relu1": (128, 16), "relu2": (256, 8), "relu3": (512, 4), "relu4": (512, 4)},
    "vgg19": {"relu1": (128, 16), "relu2": (256, 8), "relu3": (512, 4), "relu4": (512, 4)},
    "mobilenetv2": {"blocks.1": (12, 16), "blocks.2": (16, 8), "blocks.4": (48, 4), "blocks.6": (160, 2)},
    "shufflenetv1": {"layer1": (240, 16), "layer2": (480, 8), "layer3": (960, 4)},
    "shufflenetv2": {"layer1": (116, 16), "layer2": (232, 8), "layer3": (464, 4)},
    "resnet50_cifar": {"layer1": (256, 32), "layer2": (512, 16), "layer3": (1024, 8), "layer4": (2048, 4)},
    "resnet18": {"layer1": (64, 16), "layer2": (128, 8), "layer3": (256, 4), "layer4": (512, 2)},
    "resnet34": {"layer1": (64, 16), "layer2": (128, 8), "layer3": (256, 4), "layer4": (512, 2)},
}
PENULTIMATE = {
    "vgg8": 512,
    "vgg19": 512,
    "mobilenetv2": 1280,
    "shufflenetv1": 960,
    "shufflenetv2": 1024,
    "resnet50_cifar": 2048,
    "resnet18": 512,
    "resnet34": 512,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: fastest in one thread


def _side(name: str) -> int:
    return 64 if name in IMAGENET else 32


def _capture(model: nn.Module, x: torch.Tensor, paths: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``model`` on ``x`` in eval mode; return the logits and the outputs at ``paths``.

    A path ``"module:input"`` captures the module's input instead of its output.
    """
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def keep(path: str, wants_input: bool) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            captured[path] = inputs[0] if wants_input else output

        return hook

    handles = []
    for path in paths:
        mod_path, _, kind = path.partition(":")
        handles.append(modules[mod_path].register_forward_hook(keep(path, kind == "input")))
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, captured


@pytest.mark.parametrize("name", list(PARAMS_100))
def test_param_counts_match_the_source_for_100_classes(name: str) -> None:
    model = create_model(name, num_classes=100, input_shape=(3, 32, 32))
    assert count_params(model) == PARAMS_100[name]
    # The classifier is the only class-dependent layer: 10 classes drop exactly 90 * (fc.in + 1).
    fewer = create_model(name, num_classes=10, input_shape=(3, 32, 32))
    assert count_params(model) - count_params(fewer) == 90 * (model.fc.in_features + 1)


@pytest.mark.parametrize("name", list(PARAMS_1000))
def test_imagenet_resnets_match_torchvision_counts(name: str) -> None:
    model = create_model(name, num_classes=1000, input_shape=(3, 224, 224))
    assert count_params(model) == PARAMS_1000[name]
    assert count_params(create_model(name)) == PARAMS_1000[name]  # ImageNet defaults


@pytest.mark.parametrize("name", [*CIFAR, *IMAGENET])
def test_forward_gives_logits(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=100, input_shape=(3, _side(name), _side(name)))
    x = torch.randn(2, 3, _side(name), _side(name))  # (B, C, H, W)
    logits, _ = _capture(model, x, [])
    assert logits.shape == (2, 100)
    assert torch.isfinite(logits).all()
    # The two samples are told apart (relative test: at init some models give ~1e-9 logits in eval mode).
    assert not torch.allclose(logits[0], logits[1], rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("name", list(STAGES))
def test_feature_taps_are_stage_outputs(name: str) -> None:
    side = _side(name)
    model = create_model(name, num_classes=100, input_shape=(3, side, side))
    expected = STAGES[name]
    assert model.feature_taps() == list(expected)
    assert default_taps(model) == list(expected)
    logits, feats = _capture(model, torch.randn(2, 3, side, side), [*expected, "fc:input"])
    for tap, (channels, size) in expected.items():
        assert feats[tap].shape == (2, channels, size, size), tap
    assert feats["fc:input"].shape == (2, PENULTIMATE[name])
    assert logits.shape == (2, 100)


def test_vgg_pools_before_the_last_block_from_64_pixels() -> None:
    model = create_model("vgg8", num_classes=10, input_shape=(3, 64, 64))
    _, feats = _capture(model, torch.randn(1, 3, 64, 64), ["relu3", "relu4"])
    assert feats["relu3"].shape == (1, 512, 8, 8)
    assert feats["relu4"].shape == (1, 512, 4, 4)  # pool3 ran: same 4x4 as a 32x32 input gives
    _, feats = _capture(model, torch.randn(1, 3, 40, 40), ["relu3", "relu4"])
    assert feats["relu3"].shape == feats["relu4"].shape == (1, 512, 5, 5)  # no pool3 below 64


@pytest.mark.parametrize(
    ("name", "stage", "pre"),
    [
        ("vgg8", "relu2", "relu2:input"),
        ("shufflenetv1", "layer1", "layer1.3.relu_out:input"),
        ("resnet50_cifar", "layer4", "layer4.2.relu_out:input"),
        ("resnet18", "layer2", "layer2.1.relu_out:input"),
        ("shufflenetv2", "layer1", "layer1"),  # concat-then-shuffle: no single pre-ReLU tensor
        ("mobilenetv2", "blocks.2", "blocks.2"),  # linear bottleneck: already pre-activation
    ],
)
def test_pre_activation_taps_for_ab_and_ofd(name: str, stage: str, pre: str) -> None:
    side = _side(name)
    model = create_model(name, num_classes=10, input_shape=(3, side, side))
    assert pre_activation_tap(model, stage) == pre
    if pre == stage:
        return
    _, feats = _capture(model, torch.randn(2, 3, side, side), [stage, pre])
    assert feats[pre].shape == feats[stage].shape
    assert (feats[pre] < 0).any() and (feats[stage] >= 0).all()
    assert torch.equal(feats[pre].clamp(min=0), feats[stage])


@pytest.mark.parametrize("name", ["vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2", "resnet50_cifar", "resnet18"])
@pytest.mark.parametrize("shape", [(1, 32, 32), (32, 32)])
def test_single_channel_inputs(name: str, shape: tuple[int, ...]) -> None:
    model = create_model(name, num_classes=5, input_shape=shape)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    logits, _ = _capture(model, torch.randn(2, *shape), [])
    assert logits.shape == (2, 5)


def test_new_zoo_models_have_no_inplace_ops() -> None:
    for name in (*CIFAR, *IMAGENET):
        for m in create_model(name).modules():
            assert not getattr(m, "inplace", False), f"{name}: {m} is in-place"


def test_mobilenetv2_width_and_expansion() -> None:
    # mobilenetv2_T_w(6, 1.0): same hand sum with full widths (stem 32, blocks 16 ... 320).
    full = create_model("mobilenetv2", num_classes=100, width_mult=1.0)
    assert count_params(full) == 2_353_060
    assert full.dk_params == {"num_classes": 100, "width_mult": 1.0}
    wide = create_model("mobilenetv2", num_classes=10, width_mult=2.0, input_shape=(3, 16, 16))
    assert wide.fc.in_features == 2560  # the head widens only above 1
    _, feats = _capture(wide, torch.randn(2, 3, 16, 16), ["blocks.6"])
    assert feats["blocks.6"].shape == (2, 640, 1, 1)
    t1 = create_model("mobilenetv2", num_classes=10, expand_ratio=1)
    assert t1.blocks[1][0].conv[0].out_channels == t1.blocks[1][0].conv[0].in_channels


@pytest.mark.parametrize("value", [0.05, 0.0, -1.0, "wide"])
def test_mobilenetv2_bad_width_is_config_error(value: object) -> None:
    with pytest.raises(ConfigError, match="width_mult"):
        create_model("mobilenetv2", width_mult=value)


@pytest.mark.parametrize("name", [*CIFAR, *IMAGENET])
def test_bad_framework_params_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        create_model(name, num_classes=0)
    with pytest.raises(ConfigError, match="input_shape"):
        create_model(name, input_shape=(40,))


def test_imagenet_resnet_keys_follow_torchvision() -> None:
    state = create_model("resnet34").state_dict()
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert "layer2.0.downsample.1.running_var" in state
    assert "layer1.0.downsample.0.weight" not in state  # identity shortcut in stage 1
    assert state["layer3.5.conv2.weight"].shape == (256, 256, 3, 3)
    assert "layer3.6.conv1.weight" not in state  # 3-4-6-3 blocks
    assert state["fc.weight"].shape == (1000, 512)


def test_imagenet_resnet_loads_torchvision_weights() -> None:
    tv = pytest.importorskip("torchvision")
    for name in IMAGENET:
        reference = getattr(tv.models, name)(weights=None)
        ours = create_model(name)
        ours.load_state_dict(reference.state_dict(), strict=True)
        x = torch.randn(2, 3, 64, 64)  # (B, C, H, W)
        reference.eval()
        logits, _ = _capture(ours, x, [])
        with torch.no_grad():
            assert torch.allclose(logits, reference(x), atol=1e-5)
