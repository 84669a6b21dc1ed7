"""Derived-view transforms (darkknowledge.data.views): known answers, shapes, errors, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from darkknowledge.data.views import (
    VIEW_TRANSFORMS,
    ViewTransform,
    list_view_transforms,
    register_view_transform,
    view_shape,
    view_transform,
)
from darkknowledge.errors import ConfigError, ShapeError

RAMP = torch.arange(16.0).view(1, 1, 4, 4)  # rows [0..3], [4..7], [8..11], [12..15]


def test_the_four_transforms_are_registered():
    assert list_view_transforms() == ["downsample", "flatten", "profile", "render"]


# ----------------------------------------------------------------------------- downsample


def test_area_downsample_of_a_ramp_is_its_block_means():
    out = view_transform("downsample", {"size": 2})(RAMP)
    expected = torch.tensor(
        [[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4], [(8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]]
    )
    assert torch.equal(out, expected.view(1, 1, 2, 2))


def test_area_downsample_28_to_7_averages_4x4_blocks():
    torch.manual_seed(0)
    x = torch.rand(3, 2, 28, 28)
    blocks = x.view(3, 2, 7, 4, 7, 4).mean(dim=(3, 5))  # (3, 2, 7, 7)
    torch.testing.assert_close(view_transform("downsample", {"size": 7})(x), blocks)


def test_rectangular_size_and_the_other_modes():
    x = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 2, 8)  # both rows 0..7
    assert view_transform("downsample", {"size": [1, 4]})(x).flatten().tolist() == [0.5, 2.5, 4.5, 6.5]
    nearest = view_transform("downsample", {"size": (2, 4), "mode": "nearest"})(x)
    assert nearest[0, 0].tolist() == [[0.0, 2.0, 4.0, 6.0]] * 2
    bilinear = view_transform("downsample", {"size": (2, 4), "mode": "bilinear"})(x)  # centres at 0.5, 2.5, ...
    assert bilinear[0, 0].tolist() == [[0.5, 2.5, 4.5, 6.5]] * 2


def test_antialiased_bilinear_differs_from_plain_bilinear_and_keeps_the_mean_of_a_ramp():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 28, 28)
    plain = view_transform("downsample", {"size": 7, "mode": "bilinear"})(x)
    smooth = view_transform("downsample", {"size": 7, "mode": "bilinear", "antialias": True})(x)
    assert (plain - smooth).abs().max() > 0.05  # antialias averages over the whole 4x footprint
    assert smooth.std() < plain.std()  # a wider low-pass filter: less variance from pixel noise


def test_antialiased_bilinear_matches_pil_the_resize_of_the_papers_code():
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")
    torch.manual_seed(0)
    x = torch.rand(28, 28)
    pil = image.fromarray(x.numpy(), mode="F").resize((7, 7), image.BILINEAR)
    ours = view_transform("downsample", {"size": 7, "mode": "bilinear", "antialias": True})(x.view(1, 1, 28, 28))
    torch.testing.assert_close(ours[0, 0], torch.from_numpy(np.array(pil)), atol=1e-5, rtol=0)


def test_downsample_of_1d_signals_with_and_without_channels():
    x = torch.arange(8.0).view(1, 1, 8)
    assert view_transform("downsample", {"size": 4})(x).tolist() == [[[0.5, 2.5, 4.5, 6.5]]]
    assert view_transform("downsample", {"size": 2})(x[:, 0]).tolist() == [[1.5, 5.5]]  # (B, L) -> (B, l)


# ----------------------------------------------------------------------------- profile


def test_profile_of_a_known_image():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).view(1, 1, 2, 3)
    assert view_transform("profile", {"axes": "rows"})(x).tolist() == [[[2.0, 5.0]]]
    assert view_transform("profile", {"axes": "columns"})(x).tolist() == [[[2.5, 3.5, 4.5]]]
    assert view_transform("profile", {})(x).tolist() == [[[2.0, 5.0, 2.5, 3.5, 4.5]]]  # rows first


def test_profile_keeps_channels_apart():
    x = torch.stack([torch.zeros(3, 4), torch.ones(3, 4)]).unsqueeze(0)  # (1, 2, 3, 4)
    out = view_transform("profile", {})(x)
    assert out.shape == (1, 2, 7) and out[0, 0].eq(0).all() and out[0, 1].eq(1).all()


# ----------------------------------------------------------------------------- render


def test_render_peaks_on_the_rows_of_the_values():
    # height 6 over (-3, 3): row centres 2.5, 1.5, 0.5, -0.5, -1.5, -2.5 (highest at the top)
    x = torch.tensor([[[2.5, -2.5, 0.5, -0.5]]])
    image = view_transform("render", {"height": 6})(x)
    assert image.shape == (1, 1, 6, 4)
    assert image[0, 0].argmax(dim=0).tolist() == [0, 5, 2, 3]
    assert torch.allclose(image[0, 0].amax(dim=0), torch.ones(4))


def test_render_values_follow_the_gaussian_formula():
    x = torch.zeros(1, 1, 1)
    default = view_transform("render", {"height": 6})(x)[0, 0, :, 0]  # width = 6 / 6 = 1
    rows = torch.tensor([2.5, 1.5, 0.5, -0.5, -1.5, -2.5])
    torch.testing.assert_close(default, torch.exp(-(rows**2) / 2))
    narrow = view_transform("render", {"height": 6, "width": 0.5})(x)[0, 0, :, 0]
    torch.testing.assert_close(narrow, torch.exp(-(rows**2) / (2 * 0.25)))
    shifted = view_transform("render", {"height": 2, "range": (0, 10)})(torch.zeros(1, 1, 1))[0, 0, :, 0]
    torch.testing.assert_close(shifted, torch.exp(-(torch.tensor([7.5, 2.5]) ** 2) / (2 * 25.0)))


def test_render_with_per_sample_range_is_invariant_to_scale_and_offset():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10)
    per_sample = view_transform("render", {"height": 8, "range": "sample"})
    torch.testing.assert_close(per_sample(x), per_sample(5.0 * x + 2.0))
    first = per_sample(x[:1])
    lo, hi = x[0].min(), x[0].max()
    rows = hi - (hi - lo) * (torch.arange(8.0) + 0.5) / 8  # (8,)
    width = (hi - lo) / 8
    torch.testing.assert_close(first[0, 1, :, 4], torch.exp(-((rows - x[0, 1, 4]) ** 2) / (2 * width**2)))


def test_render_of_a_constant_sample_puts_the_line_in_the_middle():
    image = view_transform("render", {"height": 4, "range": "sample"})(torch.full((1, 1, 3), 7.0))
    assert torch.isfinite(image).all()
    column = image[0, 0, :, 0]  # range (6, 8): rows 7.75, 7.25, 6.75, 6.25
    torch.testing.assert_close(column, torch.exp(-(torch.tensor([0.75, 0.25, 0.25, 0.75]) ** 2) / (2 * 0.25)))


def test_render_of_a_single_trace_has_one_channel():
    assert view_transform("render", {"height": 5})(torch.zeros(3, 9)).shape == (3, 1, 5, 9)


# ----------------------------------------------------------------------------- flatten


def test_flatten_is_row_major():
    x = torch.arange(12.0).view(2, 1, 2, 3)
    assert torch.equal(view_transform("flatten", {})(x), torch.arange(12.0).view(2, 6))
    assert view_transform("flatten", None)(torch.ones(4)).shape == (4, 1)  # a batch of scalars


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "name,params,in_shape,out_shape",
    [
        ("downsample", {"size": 7}, (1, 28, 28), (1, 7, 7)),
        ("downsample", {"size": [3, 5], "mode": "bilinear", "antialias": True}, (2, 12, 10), (2, 3, 5)),
        ("downsample", {"size": 10}, (40,), (10,)),
        ("downsample", {"size": 10, "mode": "nearest"}, (3, 40), (3, 10)),
        ("profile", {}, (1, 28, 28), (1, 56)),
        ("profile", {"axes": "rows"}, (3, 8, 5), (3, 8)),
        ("profile", {"axes": "columns"}, (3, 8, 5), (3, 5)),
        ("render", {}, (40,), (1, 16, 40)),
        ("render", {"height": 8, "range": "sample"}, (2, 40), (2, 8, 40)),
        ("flatten", {}, (1, 7, 7), (49,)),
    ],
)
def test_view_shape_matches_the_output(name, params, in_shape, out_shape):
    assert view_shape(name, params, in_shape) == out_shape
    torch.manual_seed(0)
    assert view_transform(name, params)(torch.randn(3, *in_shape)).shape == (3, *out_shape)


def test_views_chain_an_image_into_a_rendered_profile():
    size = view_shape("profile", {}, (1, 28, 28))
    assert view_shape("render", {"height": 12}, size) == (1, 12, 56)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name,params,match",
    [
        (
            "downsampel",
            {"size": 7},
            (
                r"unknown view transform 'downsampel'.*Did you mean 'downsample'.*"
                r"Valid view transform names: downsample, flatten, profile, render"
            ),
        ),
        ("downsample", {}, r"view\.downsample: missing required parameter 'size'"),
        ("downsample", {"size": 0}, r"view\.downsample\.size: .*positive int or a pair.*\(got 0\)"),
        ("downsample", {"size": (7, 7, 7)}, r"view\.downsample\.size: .*\(got \(7, 7, 7\)\)"),
        ("downsample", {"size": 7, "mode": "bicubic"}, r"view\.downsample\.mode: .*'area', 'bilinear' or 'nearest'"),
        ("downsample", {"size": 7, "antialias": True}, r"view\.downsample\.antialias: only mode 'bilinear'"),
        ("profile", {"axis": "rows"}, r"view\.profile\.axis: unknown parameter 'axis'.*Did you mean 'axes'"),
        ("render", {"range": (3, -3)}, r"view\.render\.range: .*lo < hi.*\(got \(3, -3\)\)"),
        ("render", {"range": (0, math.inf)}, r"view\.render\.range: .*finite"),
        ("render", {"range": "per-sample"}, r"view\.render\.range: .*'sample'"),
        ("render", {"height": 0}, r"view\.render\.height: .*greater than 0"),
        ("render", {"width": -1.0}, r"view\.render\.width: .*greater than 0"),
    ],
)
def test_bad_names_and_params_raise_one_clear_config_error(name, params, match):
    with pytest.raises(ConfigError, match=match):
        view_transform(name, params)


@pytest.mark.parametrize(
    "name,params,in_shape,match",
    [
        ("profile", {}, (40,), r"'profile' expects images \(B, C, H, W\).*sample shape \(40,\)"),
        ("render", {}, (1, 28, 28), r"'render' expects signals \(B, C, L\) or \(B, L\).*sample shape \(1, 28, 28\)"),
        ("downsample", {"size": 8}, (1, 7, 7), r"size: 8 is larger than the input, sample shape \(1, 7, 7\)"),
        ("downsample", {"size": (2, 2)}, (40,), r"a 1-D signal takes one int size.*sample shape \(40,\)"),
        ("downsample", {"size": 2}, (1, 2, 4, 4), r"'downsample' expects images.*sample shape \(1, 2, 4, 4\)"),
    ],
)
def test_shapes_a_transform_does_not_take_raise_a_shape_error(name, params, in_shape, match):
    with pytest.raises(ShapeError, match=match):
        view_shape(name, params, in_shape)


@pytest.mark.parametrize("in_shape", [(0, 4), (1, -2), 28, (1.0, 2)])
def test_a_bad_in_shape_is_a_config_error(in_shape):
    with pytest.raises(ConfigError, match="in_shape must be a tuple of positive ints"):
        view_shape("flatten", {}, in_shape)


def test_integer_input_is_rejected_by_name():
    with pytest.raises(ConfigError, match=r"'profile' needs a floating-point tensor, got torch.uint8"):
        view_transform("profile", {})(torch.zeros(1, 1, 2, 2, dtype=torch.uint8))


def test_params_must_be_a_mapping():
    with pytest.raises(ConfigError, match="params must be a mapping"):
        view_transform("flatten", [("size", 7)])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- gradients, dtype, purity

CASES = [
    ("downsample", {"size": 3}, (2, 6, 6)),
    ("downsample", {"size": (2, 3), "mode": "bilinear", "antialias": True}, (1, 5, 7)),
    ("downsample", {"size": 3, "mode": "nearest"}, (2, 7)),
    ("profile", {}, (2, 3, 4)),
    ("render", {"height": 5}, (2, 6)),
    ("render", {"height": 4, "range": "sample", "width": 0.7}, (6,)),
    ("flatten", {}, (2, 3)),
]


@pytest.mark.parametrize("name,params,in_shape", CASES, ids=lambda c: str(c))
def test_gradients_match_finite_differences(name, params, in_shape):
    torch.manual_seed(0)
    transform = view_transform(name, params)
    x = torch.randn(2, *in_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(transform, (x,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name,params,in_shape", CASES, ids=lambda c: str(c))
def test_dtype_and_device_are_kept_and_input_is_untouched(name, params, in_shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(3, *in_shape).to(dtype)
    before = x.clone()
    transform = view_transform(name, params)
    out = transform(x)
    assert out.dtype == dtype and out.device == x.device
    assert torch.equal(x, before) and torch.equal(out, transform(x))  # pure, deterministic
    meta = transform(torch.empty(3, *in_shape, device="meta", dtype=dtype))  # no tensor is made on another device
    assert meta.device.type == "meta" and meta.shape == out.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name,params,in_shape", CASES, ids=lambda c: str(c))
def test_on_the_gpu_the_transforms_agree_with_the_cpu(name, params, in_shape):
    torch.manual_seed(0)
    x = torch.randn(3, *in_shape)
    transform = view_transform(name, params)
    out = transform(x.cuda())
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), transform(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- registry


def test_bound_params_include_defaults():
    t = view_transform("render", {"range": [-1, 1]})
    assert isinstance(t, ViewTransform) and t.name == "render"
    assert dict(t.params) == {"height": 16, "range": (-1.0, 1.0), "width": None}
    assert t == view_transform("render", {"range": (-1.0, 1.0), "height": 16})


def test_a_new_transform_registers_with_the_decorator(monkeypatch):
    monkeypatch.setattr(VIEW_TRANSFORMS, "_items", dict(VIEW_TRANSFORMS._items))  # undone after the test

    @register_view_transform("scale_test")
    def scale_test(x: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
        return x * factor

    assert view_shape("scale_test", {"factor": 3}, (2, 2)) == (2, 2)
    assert view_transform("scale_test", {"factor": "3"})(torch.ones(1, 2)).tolist() == [[3.0, 3.0]]
    with pytest.raises(ConfigError, match=r"view\.scale_test\.factor: .*valid number"):
        view_transform("scale_test", {"factor": "big"})


def test_errors_name_the_callers_config_path():
    with pytest.raises(ConfigError, match=r"^data\.views\.small\.params\.size: "):
        view_shape("downsample", {"size": -7}, (1, 28, 28), where="data.views.small.params")
