"""Real low-bit storage (students/quant/pack.py): bit packing, integer weights, packed state dicts, sizes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save
from torch import nn

from darkknowledge.errors import CheckpointError, ConfigError
from darkknowledge.models import create_model
from darkknowledge.students.quant import (
    QuantLinear,
    QuantSpec,
    integer_weights,
    pack_codes,
    packed_state_dict,
    quantize_model,
    quantized_nbytes,
    unpack_codes,
    unpack_state_dict,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnn1d(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn1d", num_classes=4, input_shape=(16,), channels=4, depth=3, kernel_size=3)


def wide_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))


def test_bit_layout_by_hand():
    # 2 bits: four codes a byte, the first in the low bits: 0 | 1<<2 | 2<<4 | 3<<6 = 228
    assert pack_codes(torch.tensor([0, 1, 2, 3]), 2).tolist() == [228]
    assert pack_codes(torch.tensor([1, 15]), 4).tolist() == [0xF1]
    # 3 bits: 5 = 101, 3 = 011, 7 = 111 -> stream (low first) 1,0,1, 1,1,0, 1,1 | 1 -> bytes 221, 1
    assert pack_codes(torch.tensor([5, 3, 7]), 3).tolist() == [221, 1]
    assert pack_codes(torch.tensor([0, 255, 7]), 8).tolist() == [0, 255, 7]
    assert pack_codes(torch.tensor([3, 0, 0, 0, 2]), 2).tolist() == [3, 2]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_round_trip_and_size(bits: int):
    gen = torch.Generator().manual_seed(bits)
    count = (1 << 18) + 13 if bits == 3 else 1001  # 3 bits: across a packing chunk boundary
    codes = torch.randint(0, 2**bits, (count,), generator=gen)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (count * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, count), codes)


def test_integer_weights_of_quantized_layers():
    torch.manual_seed(0)
    layer = nn.Linear(9, 5)
    lsq = QuantLinear.from_float(layer, QuantSpec(bits=8))
    w = integer_weights(lsq)
    assert w.codes.dtype == torch.int8 and w.scale.shape == (5,) and not w.zero_point.any()
    assert torch.equal((w.codes.float() - w.zero_point[:, None]) * w.scale[:, None], lsq.quantized_weight())
    minmax = QuantLinear.from_float(layer, QuantSpec(bits=8, method="minmax", per_channel=False))
    m = integer_weights(minmax)
    assert m.codes.dtype == torch.int16 and int(m.codes.min()) == 0 and int(m.codes.max()) == 255
    assert m.scale.shape == (1,) and m.zero_point.shape == (1,)
    assert torch.equal((m.codes.float() - m.zero_point) * m.scale, minmax.quantized_weight())
    assert integer_weights(QuantLinear.from_float(layer, QuantSpec(bits=7, method="minmax"))).codes.dtype == torch.int8
    with pytest.raises(ConfigError, match="expects a quantized layer .* got Linear"):
        integer_weights(layer)


@pytest.mark.parametrize(
    ("bits", "method", "per_channel"),
    [
        (2, "lsq", True),
        (3, "lsq", False),
        (4, "lsq", True),
        (8, "lsq", True),
        (3, "minmax", True),
        (8, "minmax", False),
        (5, "minmax", True),
    ],
)
def test_packed_round_trip_equals_the_fake_quantized_weights(bits: int, method: str, per_channel: bool):
    model = tiny_cnn1d()
    paths = quantize_model(
        model, QuantSpec(bits=bits, act_bits=4, method=method, per_channel=per_channel, keep_first=False)
    )
    x = torch.randn(6, 16)
    with torch.no_grad():
        expected = model(x)
    packed = packed_state_dict(model)
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in packed.values())
    unpacked = unpack_state_dict(packed)
    for path in paths:
        layer = model.get_submodule(path)
        assert packed[f"{path}.weight.q_codes"].numel() == (layer.weight.numel() * bits + 7) // 8
        assert torch.equal(unpacked[f"{path}.weight"], layer.quantized_weight().detach())
    assert set(unpacked) == set(model.state_dict())
    assert torch.equal(unpacked["fc.bias"], model.fc.bias.detach())  # kept tensors pass through
    fresh = tiny_cnn1d(seed=3)
    quantize_model(fresh, QuantSpec(bits=bits, act_bits=4, method=method, per_channel=per_channel, keep_first=False))
    fresh.load_state_dict(unpacked)
    with torch.no_grad():
        assert torch.allclose(fresh(x), expected, atol=1e-6)
    assert {k: v.tolist() for k, v in load(save(packed)).items()} == {k: v.tolist() for k, v in packed.items()}


def test_two_bit_weights_take_a_sixteenth_of_float32():
    model = wide_mlp()
    float_bytes = quantized_nbytes(model, default_bits=None)
    weights = [m.weight.numel() for m in model if isinstance(m, nn.Linear)]
    quantize_model(model, QuantSpec(bits=2, keep_first=False, keep_last=False))
    packed = packed_state_dict(model)
    codes = sum(packed[f"{i}.weight.q_codes"].numel() for i in (0, 2, 4))
    assert codes * 16 == sum(weights) * 4  # 2 bits a weight vs 32
    total = quantized_nbytes(model)  # + biases, scales and steps in float32, and the file header
    assert total == len(save(packed))
    assert float_bytes / 16 < total < float_bytes / 12


def test_float_models_are_packed_at_default_bits_or_kept():
    model = wide_mlp()
    x = torch.randn(4, 256)
    kept = packed_state_dict(model, default_bits=None)
    assert kept.keys() == model.state_dict().keys()
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())
    ptq = packed_state_dict(model, default_bits=8)
    assert ptq["0.weight.q_codes"].numel() == 256 * 256 and ptq["0.weight.q_meta"].tolist() == [8, 0, 256, 256]
    assert torch.equal(ptq["0.bias"], model[0].bias.detach())
    assert 3.5 < quantized_nbytes(model, None) / quantized_nbytes(model, 8) < 4
    restored = wide_mlp(seed=1)
    restored.load_state_dict(unpack_state_dict(ptq))
    with torch.no_grad():
        ref, out = model(x), restored(x)
    assert 0 < (out - ref).norm() / ref.norm() < 0.01  # per-channel 8-bit post-training quantization


def test_full_precision_layers_of_a_quantized_model_stay_float32():
    model = tiny_cnn1d()
    paths = quantize_model(model, QuantSpec(bits=4))  # blocks.0.0 and fc kept in full precision
    packed = packed_state_dict(model, default_bits=8)
    assert paths == ["blocks.1.0", "blocks.2.0"]
    assert torch.equal(packed["fc.weight"], model.fc.weight.detach()) and "fc.weight.q_codes" not in packed
    assert torch.equal(packed["blocks.0.0.weight"], model.blocks[0][0].weight.detach())


def test_half_precision_and_tied_weights_are_stored_as_plain_float32():
    model = wide_mlp().half()
    model[4].weight = model[2].weight  # tied: one storage under two keys
    packed = packed_state_dict(model, default_bits=None)
    assert packed["2.weight"].dtype == torch.float32 and packed["0.bias"].dtype == torch.float32
    assert len(save(packed)) == quantized_nbytes(model, None)


def test_bad_packing_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match=r"default_bits: .*2\.\.8, got 9"):
        packed_state_dict(tiny_cnn1d(), default_bits=9)
    with pytest.raises(ConfigError, match=r"\[0, 3\] for 2 bits, got \[0, 4\]"):
        pack_codes(torch.tensor([0, 4]), 2)
    with pytest.raises(CheckpointError, match="10 codes of 4 bits need 5 uint8 bytes, got 3"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 10)
    packed = packed_state_dict(wide_mlp(), default_bits=4)
    del packed["2.weight.q_meta"]
    with pytest.raises(CheckpointError, match=r"'2\.weight\.q_meta' is missing"):
        unpack_state_dict(packed)
