"""Fake quantization (students/quant): LSQ and min-max math, quantizers, quantized layers, model wrapping.

Every expected value is computed by hand or by plain integer arithmetic, never by the code under test.
"""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.models import create_model
from darkknowledge.students.quant import (
    LsqQuantizer,
    MinMaxQuantizer,
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    integer_weights,
    is_quantized,
    lsq_fake_quant,
    minmax_fake_quant,
    quant_summary,
    quantize_model,
)
from darkknowledge.taps import module_paths

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnn1d(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn1d", num_classes=4, input_shape=(16,), channels=4, depth=3, kernel_size=3)


def tiny_mlp(seed: int = 0, hidden: tuple[int, ...] = (8, 8)) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", num_classes=3, input_shape=(6,), hidden=hidden)


# --- LSQ math (Esser et al., Eqs. 1-5) -------------------------------------------------------------


def test_lsq_forward_and_gradients_match_the_paper_on_hand_values():
    # 3-bit signed: Q_N = 4, Q_P = 3; s = 0.5, so v/s = [0.6, -6, 4, -1.7]
    v = torch.tensor([0.3, -3.0, 2.0, -0.85], requires_grad=True)
    step = torch.tensor([0.5], requires_grad=True)
    g = 0.25
    out = lsq_fake_quant(v, step, 4, 3, grad_scale=g)
    assert torch.allclose(out, torch.tensor([0.5, -2.0, 1.5, -1.0]))  # round(clip(v/s)) * s
    # Eq. 3 per element: inside -v/s + round(v/s); clipped low -Q_N; clipped high Q_P
    expected_ds = [-0.6 + 1.0, -4.0, 3.0, 1.7 - 2.0]
    expected_dv = [1.0, 0.0, 0.0, 1.0]  # Eq. 5: straight through inside, zero outside
    for i in range(4):
        dv, ds = torch.autograd.grad(out[i], (v, step), retain_graph=True)
        assert ds.item() == pytest.approx(g * expected_ds[i], abs=1e-6), i
        assert dv.tolist() == [expected_dv[i] if j == i else 0.0 for j in range(4)]


def test_lsq_weight_quantizer_init_and_gradient_scale_per_channel():
    w = torch.tensor([[0.4, -0.2, 0.1, -0.5], [2.0, 1.0, -3.0, 0.5]])
    quant = LsqQuantizer(bits=3, signed=True, per_channel=True, channels=2)
    out = quant(w)
    q_p = 3
    expected_step = [2 * (0.4 + 0.2 + 0.1 + 0.5) / 4 / math.sqrt(q_p), 2 * (2 + 1 + 3 + 0.5) / 4 / math.sqrt(q_p)]
    assert quant.step.detach().tolist() == pytest.approx(expected_step, rel=1e-6)
    assert bool(quant.initialized) and bool(quant.signed)
    out.sum().backward()
    g = 1 / math.sqrt(4 * q_p)  # N_W = 4 weights per step
    for c in range(2):
        s = expected_step[c]
        total = 0.0
        for x in w[c].tolist():
            r = x / s
            total += -4.0 if r <= -4 else (3.0 if r >= 3 else -r + round(r))
        assert quant.step.grad[c].item() == pytest.approx(g * total, abs=1e-5)
    # w / s = [[1.15, -0.58, 0.29, -1.44], [1.07, 0.53, -1.60, 0.27]] -> rounded codes, times s
    codes = torch.tensor([[1.0, -1.0, 0.0, -1.0], [1.0, 1.0, -2.0, 0.0]])
    assert torch.allclose(out, codes * torch.tensor(expected_step)[:, None])


def test_lsq_activation_quantizer_picks_its_range_and_counts_features():
    x = torch.rand(5, 3, 2) + 0.1  # >= 0: unsigned, Q_P = 15 at 4 bits
    quant = LsqQuantizer(bits=4, signed=None, activation=True)
    quant(x).sum().backward()
    assert not bool(quant.signed) and quant.bounds() == (0, 15)
    assert quant.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(15), rel=1e-6)
    s = quant.step.item()
    inside = sum(-v / s + round(v / s) if v / s < 15 else 15.0 for v in x.flatten().tolist())
    assert quant.step.grad.item() == pytest.approx(inside / math.sqrt(6 * 15), abs=1e-4)  # N_F = 3 * 2
    signed = LsqQuantizer(bits=4, signed=None, activation=True)
    signed(torch.randn(4, 3))
    assert bool(signed.signed) and signed.bounds() == (8, 7)


def test_lsq_init_is_kept_in_the_state_dict_and_not_redone():
    quant = LsqQuantizer(bits=4, signed=None, activation=True)
    quant(torch.rand(8, 5) * 3)
    fresh = LsqQuantizer(bits=4, signed=None, activation=True)
    fresh.load_state_dict(quant.state_dict())
    x = -torch.rand(8, 5)  # would make a fresh quantizer signed, with another step
    assert torch.equal(fresh(x), quant(x))
    assert fresh.step.item() == quant.step.item() and not bool(fresh.signed)


def test_lsq_init_under_inference_mode_then_trains():
    quant = LsqQuantizer(bits=4, signed=None, activation=True)
    with torch.inference_mode():
        quant(torch.rand(4, 3))
    x = torch.rand(4, 3, requires_grad=True)
    quant(x).sum().backward()
    assert quant.step.grad is not None and x.grad is not None


# --- min-max math (Polino et al., Sec. 2.1) ---------------------------------------------------------


def test_minmax_levels_on_hand_values_and_straight_through_gradient():
    # 2 bits: 4 levels over [min, max] = [-1, 1]: sc(v) = (v + 1) / 2 = [0, .5, .75, 1] -> *3 -> round
    v = torch.tensor([[-1.0, 0.0, 0.5, 1.0]], requires_grad=True)
    out = minmax_fake_quant(v, bits=2, per_channel=True)
    assert torch.allclose(out, torch.tensor([[-1.0, 1 / 3, 1 / 3, 1.0]]), atol=1e-6)
    out.backward(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert v.grad.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    const = minmax_fake_quant(torch.full((2, 3), 0.7), bits=3, per_channel=False)  # alpha = 0 -> 1
    assert torch.allclose(const, torch.full((2, 3), 0.7))


@pytest.mark.parametrize("method", ["lsq", "minmax"])
def test_two_bit_weights_take_at_most_four_values(method: str):
    torch.manual_seed(0)
    layer = nn.Linear(50, 6)
    per_channel = QuantLinear.from_float(layer, QuantSpec(bits=2, method=method)).quantized_weight()
    assert all(len(set(row.tolist())) <= 4 for row in per_channel)
    assert len(set(per_channel.flatten().tolist())) > 4  # each channel has its own grid
    per_tensor = QuantLinear.from_float(layer, QuantSpec(bits=2, method=method, per_channel=False)).quantized_weight()
    assert len(set(per_tensor.flatten().tolist())) <= 4


def test_bit_widths_outside_two_to_eight_are_one_clear_error():
    with pytest.raises(ConfigError, match=r"2\.\.8, got 9"):
        LsqQuantizer(bits=9)
    with pytest.raises(ConfigError, match=r"got 1"):
        MinMaxQuantizer(bits=1)
    with pytest.raises(pydantic.ValidationError):
        QuantSpec(bits=9)
    with pytest.raises(ConfigError, match=r"student\.quantize\.act_bits: .*less than or equal to 8"):
        quantize_model(tiny_mlp(), {"bits": 4, "act_bits": 16})
    with pytest.raises(ShapeError, match="dim 0 must be 3"):
        LsqQuantizer(bits=4, per_channel=True, channels=3)(torch.randn(2, 5))


# --- quantized layers = integer arithmetic ---------------------------------------------------------


def lsq_layer_with_power_of_two_steps(layer: nn.Module, x: torch.Tensor) -> nn.Module:
    """4-bit weights and activations with steps 2^-k, so every fake-quantized product is exact."""
    quant_cls = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}[type(layer)]
    out = quant_cls.from_float(layer, QuantSpec(bits=4, act_bits=4))
    out(x)  # initialise the activation step (x >= 0: unsigned)
    with torch.no_grad():
        out.weight_quant.step.copy_(2.0 ** -torch.arange(2, 2 + out.weight.shape[0], dtype=torch.float32))
        out.act_quant.step.fill_(0.125)
    return out


def test_quant_linear_equals_integer_matmul():
    torch.manual_seed(0)
    x = torch.rand(5, 6) * 2
    layer = lsq_layer_with_power_of_two_steps(nn.Linear(6, 3), x)
    qx = layer.act_quant.quantize(x)
    w = integer_weights(layer)
    assert w.codes.dtype == torch.int8 and int(w.codes.min()) >= -8 and int(w.codes.max()) <= 7
    assert int(qx.codes.min()) >= 0 and int(qx.codes.max()) <= 15
    acc = qx.codes.long() @ w.codes.long().T  # (5, 3) int64
    expected = acc.double() * (qx.scale.double() * w.scale.double()) + layer.bias.double()
    assert torch.allclose(layer(x).double(), expected, atol=1e-6)


def test_quant_linear_minmax_equals_integer_arithmetic_with_zero_points():
    torch.manual_seed(1)
    x = torch.randn(4, 7)
    layer = QuantLinear.from_float(nn.Linear(7, 3), QuantSpec(bits=3, act_bits=5, method="minmax"))
    qx, w = layer.act_quant.quantize(x), integer_weights(layer)
    cx, cw = qx.codes.long(), w.codes.long()  # (4, 7), (3, 7)
    zx, zw, k = qx.zero_point.double(), w.zero_point.double(), x.shape[1]
    # sum_k (cw - zw)(cx - zx) = cx.cw - zx sum cw - zw sum cx + K zw zx, integer sums in int64
    acc = (cx @ cw.T).double() - zx * cw.sum(1).double() - zw * cx.sum(1, keepdim=True).double() + k * zw * zx
    expected = acc * qx.scale.double() * w.scale.double() + layer.bias.double()
    assert torch.allclose(layer(x).double(), expected, atol=1e-5)


def test_quant_conv1d_equals_integer_convolution():
    torch.manual_seed(2)
    x = torch.rand(2, 3, 11)
    layer = lsq_layer_with_power_of_two_steps(nn.Conv1d(3, 4, 3, stride=2, padding=1), x)
    cx, w = layer.act_quant.quantize(x).codes.long(), integer_weights(layer)
    cols = F.pad(cx, (1, 1)).unfold(2, 3, 2)  # (B, C_in, L_out, k) int64; padding is code 0 = real 0
    acc = torch.einsum("bclk,ock->bol", cols, w.codes.long())
    expected = acc.double() * 0.125 * w.scale.double()[None, :, None] + layer.bias.double()[None, :, None]
    assert torch.allclose(layer(x).double(), expected, atol=1e-6)


def test_quant_conv2d_equals_integer_convolution():
    torch.manual_seed(3)
    x = torch.rand(2, 2, 6, 5)
    layer = lsq_layer_with_power_of_two_steps(nn.Conv2d(2, 3, (3, 2), padding=(1, 0)), x)
    cx, w = layer.act_quant.quantize(x).codes.long(), integer_weights(layer)
    cols = F.pad(cx, (0, 0, 1, 1)).unfold(2, 3, 1).unfold(3, 2, 1)  # (B, C, H', W', 3, 2)
    acc = torch.einsum("bchwij,ocij->bohw", cols, w.codes.long())
    expected = acc.double() * 0.125 * w.scale.double()[None, :, None, None] + layer.bias.double()[None, :, None, None]
    assert torch.allclose(layer(x).double(), expected, atol=1e-6)


def test_quantized_layers_keep_the_float_interface():
    conv = nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1, groups=1, bias=False)
    q = QuantConv1d.from_float(conv, QuantSpec(bits=4))
    assert isinstance(q, nn.Conv1d) and q.bias is None and q.stride == (2,) and q.padding == (1,)
    assert torch.equal(q.weight, conv.weight) and q.act_quant is None
    assert {"weight", "weight_quant.step"} <= set(q.state_dict())
    with pytest.raises(ConfigError, match="expects an nn.Linear, got Conv1d"):
        QuantLinear.from_float(conv, QuantSpec(bits=4))


# --- whole models ------------------------------------------------------------------------------------


def relative_logit_error(build, bits: int, method: str) -> float:
    model = build()
    torch.manual_seed(5)
    x = torch.randn(16, 16) if build is tiny_cnn1d else torch.randn(16, 6)
    with torch.no_grad():
        ref = model(x)
        quantize_model(model, QuantSpec(bits=bits, act_bits=bits, method=method, keep_first=False, keep_last=False))
        out = model(x)
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("build", [tiny_cnn1d, tiny_mlp])
@pytest.mark.parametrize(("method", "tolerance"), [("minmax", 0.01), ("lsq", 0.08)])
def test_eight_bit_models_give_logits_close_to_float(build, method: str, tolerance: float):
    # Every layer quantized, weights and inputs. Min-max spreads 256 levels over each range; LSQ's
    # initial step 2<|v|>/sqrt(Q_P) is coarser (it suits low bits; training then adapts it).
    eight = relative_logit_error(build, 8, method)
    assert 0 < eight < tolerance
    assert eight < relative_logit_error(build, 4, method)


def test_keep_first_keep_last_and_paths_select_layers():
    quantizable = ["blocks.0.0", "blocks.1.0", "fc"]
    assert quantize_model(tiny_mlp(), QuantSpec(bits=4)) == ["blocks.1.0"]
    assert quantize_model(tiny_mlp(), QuantSpec(bits=4, keep_first=False)) == quantizable[:2]
    assert quantize_model(tiny_mlp(), QuantSpec(bits=4, keep_last=False)) == quantizable[1:]
    assert quantize_model(tiny_mlp(), QuantSpec(bits=4, keep_first=False, keep_last=False)) == quantizable
    model = tiny_mlp()
    paths_before, keys_before = module_paths(model), set(model.state_dict())
    assert quantize_model(model, {"bits": 4, "paths": ["fc", "blocks.0.0"]}) == ["fc", "blocks.0.0"]
    assert type(model.fc) is QuantLinear and type(model.blocks[1][0]) is nn.Linear
    assert isinstance(model.blocks[0][0], nn.Linear)
    assert set(paths_before) <= set(module_paths(model)) and keys_before <= set(model.state_dict())
    assert quant_summary(model) == {
        "blocks.0.0": {"bits": 4, "act_bits": None, "method": "lsq", "per_channel": True},
        "fc": {"bits": 4, "act_bits": None, "method": "lsq", "per_channel": True},
    }
    assert is_quantized(model) and not is_quantized(tiny_mlp())
    cnn = tiny_cnn1d()
    assert quantize_model(cnn, {"bits": 3, "modules": ["Conv1d"], "keep_last": False}) == ["blocks.1.0", "blocks.2.0"]


def test_selection_errors_name_the_bad_value_and_the_valid_choices():
    with pytest.raises(ConfigError, match=r"student\.quantize\.paths: MLP has no module 'blocks\.9'.*'blocks\.0\.0'"):
        quantize_model(tiny_mlp(), {"bits": 4, "paths": ["blocks.9"]})
    with pytest.raises(ConfigError, match=r"'blocks\.0\.1' is a ReLU.*quantizable paths: 'blocks\.0\.0'"):
        quantize_model(tiny_mlp(), {"bits": 4, "paths": ["blocks.0.1"]})
    with pytest.raises(ConfigError, match=r"modules: MLP has no Conv1d layer.*'fc \(Linear\)'"):
        quantize_model(tiny_mlp(), {"bits": 4, "modules": ["Conv1d"]})
    with pytest.raises(
        ConfigError, match=r"modules\.0: Input should be 'Conv1d', 'Conv2d' or 'Linear' \(got 'Conv3d'\)"
    ):
        quantize_model(tiny_mlp(), {"bits": 4, "modules": ["Conv3d"]})
    with pytest.raises(ConfigError, match=r"nothing to quantize.*'fc'.*keep_first.*set keep_first: false"):
        quantize_model(tiny_mlp(hidden=()), {"bits": 4})
    with pytest.raises(ConfigError, match=r"\.bit: unknown key"):
        quantize_model(tiny_mlp(), {"bit": 4})
    model = tiny_mlp()
    quantize_model(model, {"bits": 4})
    with pytest.raises(ConfigError, match=r"already quantized \('blocks\.1\.0'\)"):
        quantize_model(model, {"bits": 4})


@pytest.mark.parametrize("method", ["lsq", "minmax"])
def test_state_dict_round_trip_into_a_freshly_wrapped_model(method: str):
    spec = QuantSpec(bits=4, act_bits=4, method=method, keep_first=False)
    model = tiny_cnn1d(seed=0)
    quantize_model(model, spec)
    x = torch.randn(8, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # move the weights and the learned steps away from their initial values
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    fresh = tiny_cnn1d(seed=1)
    quantize_model(fresh, spec)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_quantized_cnn1d_trains():
    model = tiny_cnn1d()
    quantize_model(model, QuantSpec(bits=4, act_bits=4))
    torch.manual_seed(0)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    steps = [m.weight_quant.step for m in model.modules() if isinstance(m, QuantConv1d)]
    assert steps and all(s.grad is not None and torch.isfinite(s.grad).all() for s in steps)
    assert losses[-1] < 0.8 * losses[0], losses
