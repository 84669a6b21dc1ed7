"""Depthwise-separable students (darkknowledge.students.depthwise): shapes kept, cost ratio,
taps still resolve, gradients flow, and one clear error when nothing converts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from darkknowledge.errors import ConfigError
from darkknowledge.models import count_params, create_model
from darkknowledge.students.depthwise import (
    DepthwiseSeparable,
    separable_cost_ratio,
    to_depthwise,
)
from darkknowledge.taps import FeatureTaps, probe_shapes

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: fastest in one thread


def test_cost_ratio_is_mobilenets_formula() -> None:
    assert separable_cost_ratio(64, 3) == pytest.approx(1 / 64 + 1 / 3)
    assert separable_cost_ratio(64, (3, 3)) == pytest.approx(1 / 64 + 1 / 9)
    assert separable_cost_ratio(512, (3, 3)) < 1 / 8  # "8 to 9 times less computation"


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 10, 3, stride=2, padding=1),
        nn.Conv2d(6, 10, (3, 5), stride=(1, 2), padding=(2, 0), dilation=2, bias=False),
        nn.Conv2d(6, 10, 3, padding="same", padding_mode="reflect"),
        nn.Conv1d(4, 7, 5, stride=3, padding=4),
        nn.Conv1d(4, 7, 4, padding="valid", dilation=3),
    ],
    ids=["2d-strided", "2d-rect-dilated", "2d-same-reflect", "1d-strided-padded", "1d-valid-dilated"],
)
def test_separable_keeps_the_output_shape_and_cuts_weights_by_the_formula(conv: nn.Conv1d | nn.Conv2d) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, *([13] * (conv.weight.dim() - 2)))  # (B, M, *S), odd sizes
    sep = DepthwiseSeparable(conv)
    assert sep(x).shape == conv(x).shape
    assert sep.depthwise.groups == conv.in_channels and sep.depthwise.bias is None
    assert (sep.depthwise.stride, sep.depthwise.padding, sep.depthwise.dilation, sep.depthwise.padding_mode) == (
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.padding_mode,
    )
    assert (sep.pointwise.bias is None) == (conv.bias is None)
    weights = sep.depthwise.weight.numel() + sep.pointwise.weight.numel()
    assert weights / conv.weight.numel() == pytest.approx(separable_cost_ratio(conv.out_channels, conv.kernel_size))


def _convs(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Conv1d, nn.Conv2d)]


@pytest.mark.parametrize(
    ("name", "params", "shape"),
    [
        ("cnn1d", {"channels": 8, "batch_norm": True}, (2, 40)),
        ("cnn2d", {"channels": (8, 16), "hidden": 0}, (3, 12, 12)),
        ("resnet8", {}, (3, 16, 16)),
        ("vgg", {"widths": (8, 8, 16, 16, 16)}, (3, 16, 16)),
    ],
)
def test_converted_model_keeps_shapes_and_taps_and_trains(name: str, params: dict, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, input_shape=shape, **params)
    x = torch.randn(4, *shape)  # (B, *shape)
    taps = [*model.feature_taps(), "fc:input"]
    before = probe_shapes(model, x, taps)
    n_before = count_params(model)
    convs = dict(model.named_modules())
    eligible = [n for n in _convs(model) if math.prod(convs[n].kernel_size) > 1 and convs[n].in_channels > 1]

    replaced = to_depthwise(model)

    assert replaced == eligible  # every k > 1 full conv, in module order; 1x1 shortcuts kept
    modules = dict(model.named_modules())
    assert all(isinstance(modules[p], DepthwiseSeparable) for p in replaced)
    assert probe_shapes(model, x, taps) == before  # same tap paths, same shapes
    assert count_params(model) < n_before
    model.train()
    with FeatureTaps(model, taps) as hooks:
        logits = model(x)
        feats = hooks.pop()
    assert logits.shape == (4, 5) and set(feats) == set(taps)
    (logits.sum() + sum(f.sum() for f in feats.values())).backward()
    for p in replaced:
        for param in modules[p].parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, p


def test_mobilenetv2_keeps_its_depthwise_and_1x1_convs() -> None:
    model = create_model("mobilenetv2", num_classes=3, input_shape=(3, 16, 16), width_mult=0.25)
    assert to_depthwise(model) == ["conv1.0"]  # only the 3x3 stem is a full k > 1 conv


def test_single_channel_stem_is_kept() -> None:
    model = create_model("cnn1d", num_classes=3, input_shape=(40,), channels=4)
    assert to_depthwise(model) == ["blocks.1.0", "blocks.2.0"]  # blocks.0.0 reads one channel
    assert type(model.blocks[0][0]) is nn.Conv1d


def test_new_modules_follow_the_original_conv() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    conv.weight.requires_grad_(False)
    conv.eval()
    sep = DepthwiseSeparable(conv)
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in sep.parameters())
    assert not sep.training and not sep.bn.training


def test_shared_conv_is_replaced_once_everywhere() -> None:
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    assert to_depthwise(model) == ["0", "2"]
    assert model[0] is model[2] and isinstance(model[0], DepthwiseSeparable)


def test_nothing_to_convert_is_one_clear_error() -> None:
    with pytest.raises(
        ConfigError,
        match=r"student\.ops: 'depthwise' has nothing to convert in "
        r"ShuffleNetV2Cifar: its \d+ convolutions are \d+ grouped/depthwise, "
        r"\d+ 1x1\. It makes",
    ):
        to_depthwise(create_model("shufflenetv2", num_classes=3), where="student.ops")
    with pytest.raises(ConfigError, match="MLP: it has no convolution"):
        to_depthwise(create_model("mlp"))
    converted = create_model("cnn2d", channels=(4,), hidden=0, input_shape=(3, 8, 8))
    to_depthwise(converted)
    with pytest.raises(ConfigError, match="nothing to convert"):  # a second pass finds none
        to_depthwise(converted)
    with pytest.raises(ConfigError, match=r"itself a single Conv2d.*nn\.Sequential"):
        to_depthwise(nn.Conv2d(3, 4, 3))
