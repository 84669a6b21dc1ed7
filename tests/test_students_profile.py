"""Student profile (darkknowledge.students.profile) and report (darkknowledge.students.report)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.models import create_model
from darkknowledge.students import report
from darkknowledge.students.profile import (
    ModelProfile,
    count_flops,
    fp32_state,
    profile_model,
)
from darkknowledge.students.report import (
    human_bytes,
    human_flops,
    human_params,
    profile_row,
    student_table,
)

FAST = {"repeats": 3, "warmup": 1}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return create_model("mlp", hidden=[32, 16])


class Tied(nn.Module):
    """Two linear layers sharing one weight matrix (as tied embeddings do)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_counts_sizes_flops_and_latency_of_a_zoo_mlp():
    model = _mlp()
    p = profile_model(model, torch.randn(4, 40), batch_n=8, **FAST)
    numel = sum(t.numel() for t in model.parameters())
    assert p.params == numel == 40 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert 0 <= p.size_fp32_bytes - 4 * numel < 2048  # the safetensors header is a few hundred bytes
    assert p.flops == 2 * (40 * 32 + 32 * 16 + 16 * 10)  # per sample, 2 x MACs, biases not counted
    assert p.latency_ms_b1 > 0 and p.latency_ms_bN > 0
    assert (p.batch_n, p.repeats, p.threads) == (8, 3, torch.get_num_threads())


def test_flops_of_a_linear_and_of_a_conv_are_two_per_multiply_accumulate():
    lin = nn.Linear(10, 20)
    assert profile_model(lin, torch.randn(5, 10), batch_n=2, **FAST).flops == 2 * 10 * 20  # batch 1, whatever B
    conv = nn.Conv2d(3, 8, 3, padding=1)
    # 8 x 8 output positions x 8 channels, each 3 x 3 x 3 multiply-accumulates
    assert count_flops(conv, torch.randn(1, 3, 8, 8)) == 2 * (8 * 8 * 8) * (3 * 3 * 3)
    conv1d = nn.Conv1d(2, 4, 5, stride=2)  # length 20 -> (20 - 5) // 2 + 1 = 8 positions
    assert profile_model(conv1d, torch.randn(1, 2, 20), batch_n=1, **FAST).flops == 2 * (8 * 4) * (2 * 5)


def test_tied_weights_are_counted_once():
    p = profile_model(Tied(), torch.randn(1, 4), batch_n=1, **FAST)
    assert p.params == 16 + 4 + 4
    assert list(fp32_state(Tied())) == ["a.weight", "a.bias", "b.bias"]
    assert 0 <= p.size_fp32_bytes - 4 * 24 < 512


def test_fp32_size_of_a_half_precision_model_is_four_bytes_per_parameter():
    model = nn.Linear(64, 64).half()
    p = profile_model(model, torch.randn(1, 64).half(), batch_n=1, **FAST)
    assert 0 <= p.size_fp32_bytes - 4 * (64 * 64 + 64) < 512
    assert model.weight.dtype == torch.float16  # measured on a float32 copy of the state only


def test_modes_are_restored_and_the_model_is_not_moved():
    model = create_model("mlp", hidden=[8], dropout=0.5).train()
    model.blocks.eval()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    profile_model(model, torch.randn(2, 40), batch_n=2, **FAST)
    assert model.training and model.fc.training and not model.blocks.training and not model.blocks[0].training
    assert all(t.device.type == "cpu" for t in model.parameters())
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_a_model_off_the_cpu_is_measured_on_a_copy(monkeypatch):
    from darkknowledge.students import profile

    monkeypatch.setattr(profile, "_on_cpu", lambda model: False)  # as for a CUDA model: copy, never move
    model = create_model("mlp", hidden=[8]).train()
    with profile.cpu_eval(model) as net:
        assert net is not model and not net.training and model.training
        assert torch.equal(net.fc.weight, model.fc.weight) and net.fc.weight is not model.fc.weight
    assert model.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_model_is_profiled_on_a_cpu_copy_and_stays_on_cuda():
    model = create_model("mlp", hidden=[8]).cuda().train()
    p = profile_model(model, torch.randn(2, 40, device="cuda"), batch_n=2, **FAST)
    assert p.params == sum(t.numel() for t in model.parameters())
    assert all(t.device.type == "cuda" for t in model.parameters()) and model.training


def test_quantized_size_of_a_float_model_is_its_post_training_size():
    model = _mlp()
    x = torch.randn(2, 40)
    p8 = profile_model(model, x, batch_n=1, **FAST)
    p4 = profile_model(model, x, batch_n=1, quant_bits_default=4, **FAST)
    assert p8.quant_bits is None and p8.ptq_bits == 8 and p4.ptq_bits == 4
    assert p4.size_quant_bytes < p8.size_quant_bytes < p8.size_fp32_bytes
    assert p8.size_quant_bytes < 0.5 * p8.size_fp32_bytes  # 8-bit codes: about a quarter, plus scales


def test_a_quantized_model_reports_its_own_bits():
    from darkknowledge.students.quant.wrap import quantize_model

    model = _mlp()
    quantize_model(model, {"bits": 4, "keep_first": False, "keep_last": False})
    p = profile_model(model, torch.randn(2, 40), batch_n=1, **FAST)
    assert p.quant_bits == 4 and p.ptq_bits is None
    assert p.size_quant_bytes < p.size_fp32_bytes


def test_bad_arguments_raise_clear_errors():
    model = _mlp()
    with pytest.raises(ConfigError, match="batch_n must be an integer >= 1, got 0"):
        profile_model(model, torch.randn(2, 40), batch_n=0)
    with pytest.raises(ConfigError, match="repeats must be an integer >= 1, got 2.5"):
        profile_model(model, torch.randn(2, 40), batch_n=1, repeats=2.5)
    with pytest.raises(ShapeError, match=r"batch >= 1.*got \(0, 40\)"):
        profile_model(model, torch.randn(0, 40), batch_n=1)
    with pytest.raises(ShapeError, match=r"does not run on an example of shape \(1, 7\)"):
        profile_model(model, torch.randn(2, 7), batch_n=1)
    assert model.training


def test_profile_dict_round_trip():
    p = profile_model(nn.Linear(3, 2), torch.randn(1, 3), batch_n=1, **FAST)
    assert ModelProfile.from_dict(p.to_dict()) == p
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['speed'\]"):
        ModelProfile.from_dict({**p.to_dict(), "speed": 1})


def _hand(params: int, fp32: int, quant: int, latency: float, bits: int | None = None) -> ModelProfile:
    return ModelProfile(
        params=params,
        size_fp32_bytes=fp32,
        size_quant_bytes=quant,
        quant_bits=bits,
        flops=41_200_000,
        latency_ms_b1=latency,
        latency_ms_bN=8 * latency,
        batch_n=64,
        threads=2,
        repeats=20,
        ptq_bits=None if bits else 8,
    )


def _cells(table: str) -> dict[str, list[str]]:
    lines = table.strip().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {row[1]: dict(zip(head, row, strict=True)) for row in rows}


def test_table_ratios_against_the_teacher():
    rows = [
        profile_row("teacher", "resnet", _hand(1_000_000, 4_000_000, 1_000_000, 10.0), 92.3),
        profile_row("student", "small", _hand(13_700, 400_000, 100_000, 2.5), 74.17),
        profile_row("student", "small-q4", _hand(13_700, 400_000, 50_000, 4.0, bits=4), 73.0),
    ]
    cells = _cells(student_table(rows))
    assert cells["resnet"]["role"] == "teacher" and cells["resnet"]["speed-up"] == "1.00x"
    assert cells["resnet"]["compression"] == "1.00x"
    assert cells["small"]["speed-up"] == "4.00x" and cells["small"]["compression"] == "10.00x"  # fp32 sizes
    assert cells["small-q4"]["speed-up"] == "2.50x" and cells["small-q4"]["compression"] == "80.00x"  # packed size
    assert cells["small"]["params"] == "13.7K" and cells["resnet"]["params"] == "1.00M"
    assert cells["small"]["size fp32"] == "400 KB" and cells["resnet"]["size fp32"] == "4.00 MB"
    assert cells["small"]["size quantized"] == "100 KB (8-bit PTQ)"
    assert cells["small-q4"]["size quantized"] == "50.0 KB (4-bit)"
    assert cells["small"]["FLOPs"] == "41.2 MFLOPs" and cells["small"]["acc"] == "74.17"
    assert cells["small"]["latency b=1 (ms)"] == "2.50" and cells["small"]["latency b=64 (ms)"] == "20.0"


def test_table_without_a_teacher_and_with_unknown_accuracy():
    cells = _cells(student_table([profile_row("student", "s", _hand(10, 40, 10, 1.0), None)]))
    assert cells["s"]["speed-up"] == cells["s"]["compression"] == cells["s"]["acc"] == "-"


def test_human_units():
    assert [human_params(v) for v in (950, 15_210, 999_960, 2_500_000)] == ["950", "15.2K", "1.00M", "2.50M"]
    assert [human_bytes(v) for v in (512, 61_376, 1_234_567)] == ["512 B", "61.4 KB", "1.23 MB"]
    assert [human_flops(v) for v in (400, 326_400, 1.82e9)] == ["400 FLOPs", "326 KFLOPs", "1.82 GFLOPs"]


def test_bad_rows_raise_clear_errors():
    with pytest.raises(ConfigError, match=r"row 0 \('x'\) lacks .*latency_ms_b1"):
        student_table([{"role": "student", "name": "x", "params": 1}])
    with pytest.raises(ConfigError, match="acc must be a number or None"):
        profile_row("student", "x", _hand(1, 4, 1, 1.0), "high")


def test_accuracy_latency_plot(tmp_path, monkeypatch):
    rows = [
        profile_row("teacher", "t", _hand(100, 400, 100, 10.0), 90.0),
        profile_row("student", "s", _hand(10, 40, 10, 1.0), 80.0),
    ]
    if report.have_matplotlib():
        out = report.plot_accuracy_latency(rows, tmp_path / "figs" / "acc.png")
        assert out == tmp_path / "figs" / "acc.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    assert report.plot_accuracy_latency(rows, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    with pytest.raises(ConfigError, match="nothing to plot"):
        report.plot_accuracy_latency([profile_row("student", "s", _hand(10, 40, 10, 1.0), None)], tmp_path / "x.png")


def test_run_profiler_feeds_token_ids_to_a_token_model():
    """A run on int64 token-id data profiles its models with token ids (gaussian floats would fail
    an embedding lookup, and the profile would be skipped)."""
    from darkknowledge.config import ProfileConfig
    from darkknowledge.data.bundle import DatasetInfo
    from darkknowledge.runs.profiling import Profiler

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.fc = nn.Embedding(10, 4), nn.Linear(4, 3)

        def forward(self, ids):  # (B, L) int64
            return self.fc(self.embed(ids).mean(1))  # (B, 3)

    info = DatasetInfo(name="tokens", num_classes=3, input_shape=(6,))
    cfg = ProfileConfig(repeats=1, warmup=0)
    profile = Profiler(cfg, info, batch_n=2, token_ids=True)(Bag(), {"name": "bag"})
    assert profile is not None and profile["params"] == sum(p.numel() for p in Bag().parameters())
    assert Profiler(cfg, info, batch_n=2)(Bag(), {"name": "bag"}) is None  # floats: skipped, as it was
