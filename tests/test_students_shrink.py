"""Shrunk students (darkknowledge.students.shrink): a rule for every zoo model, exact layouts,
the stages kept for feature losses, training, and one clear error per bad input."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError
from darkknowledge.losses.objective import Objective
from darkknowledge.models import count_params, create_model, list_models
from darkknowledge.pairs import propose_pairs
from darkknowledge.schemes.offline import offline_task
from darkknowledge.students.shrink import (
    SHRINK_RULES,
    scale,
    scale_to_step,
    shrink_spec,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: fastest in one thread

SIGNALS = {"mlp": (40,), "cnn1d": (40,), "dscnn1d": (40,)}
LENETS = ("lenet", "lenet5", "lenet5_half")
SHRINKABLE = [n for n in list_models() if n != "residual_pair"]
# Built on the meta device (shapes without memory or init time); the rest on the CPU, where small
# nets build and run faster than the meta device's per-op dispatch.
HEAVY = {
    "wrn_28_10",
    "resnet34",
    "resnet34_cifar",
    "resnet50_cifar",
    "resnet_bottleneck_cifar",
    *(n for n in SHRINKABLE if n.startswith("vgg")),
}


def _shape(name: str) -> tuple[int, ...]:
    return SIGNALS.get(name, (1, 32, 32) if name in LENETS else (3, 16, 16))


def _build(
    name: str,
    params: dict | None = None,
    num_classes: int = 10,
    device: str = "meta",
    shape: tuple[int, ...] | None = None,
) -> nn.Module:
    with torch.device(device):
        return create_model(
            name, **{"num_classes": num_classes, "input_shape": shape or _shape(name), **(params or {})}
        )


def _on_meta(name: str, params: dict | None = None, num_classes: int = 10) -> nn.Module:
    """The model with its parameters on the meta device: shapes and counts without the memory or time."""
    return _build(name, params, num_classes)


def _shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _params_of(name: str, width: float, depth: float) -> tuple[str, dict]:
    return shrink_spec(name, {}, width=width, depth=depth)


# -------------------------------------------------------------------- every registered model
def test_every_registered_model_has_a_rule() -> None:
    assert set(SHRINK_RULES.names()) == set(list_models())


@pytest.mark.parametrize("name", SHRINKABLE)
def test_rule_rebuilds_the_teacher_at_one_and_keeps_its_stages_at_half(name: str) -> None:
    device = "meta" if name in HEAVY else "cpu"
    teacher = _build(name, device=device)
    same_name, same_params = _params_of(name, 1.0, 1.0)
    same = _build(same_name, same_params, device=device)
    assert _shapes(same) == _shapes(teacher)  # width = depth = 1: the teacher's architecture
    assert count_params(same) == count_params(teacher)

    new_name, params = _params_of(name, 0.5, 0.5)
    assert new_name in list_models()
    json.dumps(params)  # an exportable spec
    student = _build(new_name, params, device=device)
    assert count_params(student) < count_params(teacher)
    taps = teacher.feature_taps()
    assert student.feature_taps() == taps
    x = torch.randn(2, *_shape(name), device=device)
    assert student(x).shape == (2, 10)
    pairs = propose_pairs(student, teacher, x)
    assert [(s, t) for s, t, _, _ in pairs] == [(t, t) for t in taps]  # stage i pairs with stage i
    for _, _, s_shape, t_shape in pairs:
        assert s_shape[1:] == t_shape[1:]  # same resolution at every stage
        assert 1 <= s_shape[0] <= t_shape[0]  # fewer (or as many) channels


def test_residual_pair_is_not_a_family() -> None:
    with pytest.raises(ConfigError, match=r"student: model 'residual_pair'.*shrink its 'student' and 'assistant'"):
        shrink_spec("residual_pair", {}, width=0.5)


# ---------------------------------------------------------------------------- known answers
def test_rounding_is_half_up_and_never_below_one() -> None:
    assert [scale(3, 0.5), scale(5, 0.3), scale(9, 0.5), scale(1, 0.01), scale(7, 1.0)] == [2, 2, 5, 1, 7]
    assert [scale_to_step(240, 0.5, 12), scale_to_step(24, 0.1, 12), scale_to_step(116, 0.3, 2)] == [120, 12, 34]


@pytest.mark.parametrize(
    ("teacher", "width", "depth", "same_as"),
    [
        ("lenet5", 0.5, 1.0, "lenet5_half"),  # DAFL's LeNet-5-HALF is LeNet-5 at half width
        ("resnet56", 1.0, 0.5, "resnet32"),  # 9 blocks per stage * 0.5 = 4.5 -> 5
        ("resnet20", 1.0, 0.5, "resnet14"),  # 3 * 0.5 = 1.5 -> 2 (half up)
        ("resnet32x4", 1.0, 0.2, "resnet8x4"),  # CRD's pair: 5 -> 1 block per stage
        ("wrn_40_2", 1.0, 1 / 3, "wrn_16_2"),  # CRD's pair: 6 -> 2 blocks per stage
        ("vgg13", 1.0, 0.5, "vgg8"),  # 2 -> 1 conv per block
    ],
)
def test_shrinking_reaches_the_zoo_relative(teacher: str, width: float, depth: float, same_as: str) -> None:
    new_name, params = _params_of(teacher, width, depth)
    student, reference = _on_meta(new_name, params), _on_meta(same_as)
    assert [s for _, s in _shapes(student)] == [s for _, s in _shapes(reference)]


def test_resnet_widths_and_blocks() -> None:
    assert _params_of("resnet32x4", 0.5, 0.2) == ("resnet_cifar", {"blocks": [1, 1, 1], "widths": [16, 32, 64, 128]})
    assert _params_of("resnet18_cifar", 0.25, 1.0) == (
        "resnet_imagenet",
        {"blocks": [2, 2, 2, 2], "widths": [16, 32, 64, 128], "stem": "cifar"},
    )
    assert _params_of("resnet50_cifar", 0.5, 0.5) == (
        "resnet_bottleneck_cifar",
        {"blocks": [2, 2, 3, 2], "planes": [32, 64, 128, 256]},
    )
    # every stage rounds on its own: 3-4-6-3 * 0.6 = 1.8, 2.4, 3.6, 1.8
    assert _params_of("resnet34", 1.0, 0.6)[1]["blocks"] == [2, 2, 4, 2]


def test_mlp_and_cnn_params_carry_over() -> None:
    name, params = shrink_spec("mlp", {"hidden": [100, 40], "dropout": 0.1, "activation": "gelu"}, width=0.5)
    assert (name, params) == ("mlp", {"hidden": [50, 20], "dropout": 0.1, "activation": "gelu", "block_layers": 1})
    name, params = shrink_spec("cnn2d", {"channels": [32, 64], "hidden": 0, "batch_norm": False}, width=0.25)
    assert params == {"channels": [8, 16], "hidden": 0, "batch_norm": False, "block_layers": 1}


@pytest.mark.parametrize("name", ["resnet20", "wrn_40_2", "vgg8", "resnet18_cifar", "resnet50_cifar", "lenet5"])
def test_half_width_cuts_parameters_about_four_times(name: str) -> None:
    teacher = count_params(_on_meta(name))
    student = count_params(_on_meta(*_params_of(name, 0.5, 1.0)))
    assert 3.3 < teacher / student < 4.05, (teacher, student)  # convs 4x; BN, biases and fc 2x


def test_mobilenetv2_scales_its_own_width_multiplier() -> None:
    name, params = _params_of("mobilenetv2", 2.0, 1.0)  # RepDistiller's mobile_half (0.5) -> full width (1.0)
    assert (name, params["width_mult"]) == ("mobilenetv2", 1.0)
    assert count_params(_on_meta(name, params, num_classes=100)) == 2_353_060  # test_models_crd's hand sum
    half = _on_meta(*_params_of("mobilenetv2", 0.5, 1.0))
    assert half.fc.in_features == 1280  # the head only widens (Sandler et al.)


def test_mobilenetv2_width_floor(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="darkknowledge.students.shrink"):
        name, params = _params_of("mobilenetv2", 0.01, 1.0)
    assert params["width_mult"] == 1 / 16 and "raised" in caplog.text
    assert _on_meta(name, params).blocks[0][0].conv[6].out_channels == 1  # 16 / 16


@pytest.mark.parametrize("width", [0.05, 0.3, 0.5, 0.77, 1.0, 1.3])
def test_shufflenet_widths_respect_groups_and_halves(width: float) -> None:
    name, v1 = _params_of("shufflenetv1", width, 1.0)
    widths, stem = v1["widths"], v1["stem_channels"]
    assert stem % 12 == 0 and all(w % 12 == 0 for w in widths)
    assert stem < widths[0] < widths[1] < widths[2]  # every first block concatenates a non-empty branch
    _on_meta(name, v1)
    name, v2 = _params_of("shufflenetv2", width, 0.5)
    assert all(w % 2 == 0 for w in v2["widths"]) and v2["blocks"] == [1, 3, 1]  # 4, 8, 4 units -> 2, 4, 2
    assert v2["last_channels"] == (1024 if width <= 1 else 1331)
    _on_meta(name, v2)


def test_depth_above_one_deepens_every_stage_of_flat_families() -> None:
    for name in ("mlp", "cnn1d", "cnn2d", "dscnn1d"):
        new_name, params = _params_of(name, 1.0, 2.0)
        assert params["block_layers"] == 2
        teacher, student = _on_meta(name), _on_meta(new_name, params)
        x = torch.randn(2, *_shape(name), device="meta")
        pairs = propose_pairs(student, teacher, x)
        assert all(s == t and ss == ts for s, t, ss, ts in pairs)  # same stages, same shapes
        assert count_params(student) > count_params(teacher)
    assert len(create_model("cnn1d", block_layers=2).blocks[1]) == 4  # conv, relu, conv, relu


def test_depth_warning_when_nothing_changes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="darkknowledge.students.shrink"):
        shrink_spec("resnet8", {}, depth=0.5)
    assert "unchanged" in caplog.text and "[1, 1, 1]" in caplog.text


def test_shrinking_a_shrunk_spec_composes() -> None:
    name, params = _params_of("resnet20", 0.5, 1.0)
    back = shrink_spec(name, params, width=2.0)
    assert count_params(_on_meta(*back)) == count_params(_on_meta("resnet20"))


# ---------------------------------------------------------------------- a student that trains
TRAINED = [
    ("cnn1d", (40,)),
    ("dscnn1d", (40,)),
    ("resnet20", (3, 16, 16)),
    ("wrn_40_1", (3, 16, 16)),
    ("mobilenetv2", (3, 16, 16)),
    ("shufflenetv2", (3, 16, 16)),
]


@pytest.mark.parametrize(("name", "shape"), TRAINED, ids=[n for n, _ in TRAINED])
def test_shrunk_student_trains_with_a_fitnet_hint(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    teacher = create_model(name, num_classes=5, input_shape=shape)
    s_name, s_params = shrink_spec(name, teacher.dk_params, width=0.5, depth=0.5)
    assert s_params["num_classes"] == 5 and s_params["input_shape"] == list(shape)  # passed through
    torch.manual_seed(1)
    student = create_model(s_name, **s_params)
    spec = json.loads(json.dumps({"name": student.dk_name, "params": student.dk_params}))
    torch.manual_seed(1)
    rebuilt = create_model(spec["name"], **spec["params"])  # the exported spec rebuilds the student
    for a, b in zip(student.state_dict().values(), rebuilt.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    x, y = torch.randn(8, *shape), torch.arange(8) % 5
    pairs = propose_pairs(student, teacher, x[:2])
    taps = [s for s, _, _, _ in pairs]
    assert taps == [t for _, t, _, _ in pairs] == teacher.feature_taps()
    objective = Objective.from_config({"ce": {}, "fitnet": {"student_taps": taps, "teacher_taps": taps}})
    batch = Batch(x, y, torch.arange(8))
    scheme = offline_task(student, objective, teacher)
    scheme.setup(batch)
    module = scheme.module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    assert not any(p is q for p in params for q in teacher.parameters())
    optimizer = torch.optim.SGD(params, lr=0.02)
    losses = []
    for _ in range(6):
        total, terms = module(batch, 0.0)
        assert set(terms) == {"ce", "fitnet"} and math.isfinite(total.item())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None for p in teacher.parameters())
    assert len(objective.terms["fitnet"].regressors) == len(taps)  # one regressor per stage pair


# ---------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("value", [0, -0.5, float("nan"), float("inf"), "half", None, True])
@pytest.mark.parametrize("key", ["width", "depth"])
def test_bad_multipliers(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"teacher\.student\.{key}: must be a finite number > 0.*got {value!r}"):
        shrink_spec("resnet20", {}, **{key: value}, where="teacher.student")


@pytest.mark.parametrize("name", ["torchvision:resnet18", "resnet21"])
def test_a_model_without_a_rule_lists_the_shrinkable_ones(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"model '{name}' has no width/depth shrink rule.*resnet_cifar.*wrn_40_2"):
        shrink_spec(name, {}, width=0.5)


def test_lenet_has_no_deeper_form() -> None:
    with pytest.raises(ConfigError, match=r"student: model 'lenet5': LeNet-5 has one conv per stage.*got 2"):
        shrink_spec("lenet5", {}, depth=2)


def test_bad_teacher_params_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"student\.params\.hiden: unknown parameter.*hidden"):
        shrink_spec("mlp", {"hiden": [10]}, width=0.5)
    with pytest.raises(ConfigError, match=r"student\.params\.depth"):
        shrink_spec("wrn", {"depth": "deep"}, width=0.5)
    with pytest.raises(ConfigError, match=r"student: model 'wrn': depth must be 6n\+4.*got 18"):
        shrink_spec("wrn", {"depth": 18}, width=0.5)
