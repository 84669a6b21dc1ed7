"""Cross-rank adapters: a sequence (B, C, L) onto a feature map (B, C, H, W) and back.

Shapes both ways, the row-major correspondence on known values, BatchNorm on/off, gradients,
errors for vectors, and the FitNets / AB / AFD losses built on them (cross-modal pairs).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses import create_loss
from darkknowledge.losses.adapters import (
    CROSS_RANK_PAIRS,
    MapToSequence,
    SequenceToMap,
    build_adapter,
)
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.objective import Objective
from darkknowledge.schemes.offline import offline_task


def _random_pairs(n: int, seed: int) -> list[tuple[tuple[int, int], tuple[int, int, int]]]:
    """``n`` random (sequence, map) shape pairs; the first has ``L == H * W``, the others rarely do."""
    g = torch.Generator().manual_seed(seed)

    def r(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    pairs = [((r(1, 6), 12), (r(1, 6), 3, 4))]
    for _ in range(n - 1):
        pairs.append(((r(1, 6), r(2, 30)), (r(1, 6), r(2, 6), r(2, 6))))
    return pairs


PAIRS = _random_pairs(5, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: fastest in one thread


# ------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize(("seq", "fmap"), PAIRS)
def test_sequence_to_map_and_back_give_the_probed_shapes(seq, fmap, batch_norm):
    torch.manual_seed(0)
    to_map = build_adapter(seq, fmap, batch_norm=batch_norm)
    assert isinstance(to_map, SequenceToMap)
    assert to_map(torch.randn(3, *seq)).shape == (3, *fmap)
    to_seq = build_adapter(fmap, seq, batch_norm=batch_norm)
    assert isinstance(to_seq, MapToSequence)
    assert to_seq(torch.randn(3, *fmap)).shape == (3, *seq)


def test_length_differs_from_positions_in_some_pair():
    assert any(s[1] != m[1] * m[2] for s, m in PAIRS) and any(s[1] == m[1] * m[2] for s, m in PAIRS)
    assert CROSS_RANK_PAIRS == {(2, 3), (3, 2)}


# ---------------------------------------------------------------- row-major correspondence
def _identity_channels(adapter: nn.Module, channels: int) -> None:
    """Make the 1x1 conv the identity (no BatchNorm, zero bias)."""
    conv = adapter.proj[0]
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels).unsqueeze(-1))  # (C, C, 1)
        conv.bias.zero_()


def test_positions_follow_row_major_order():
    x_seq = torch.arange(2 * 3 * 6, dtype=torch.float32).reshape(2, 3, 6)  # (B, C, L = H * W)
    to_map = build_adapter((3, 6), (3, 2, 3), batch_norm=False)
    _identity_channels(to_map, 3)
    out = to_map(x_seq)  # step h * 3 + w -> (h, w)
    assert torch.equal(out, x_seq.reshape(2, 3, 2, 3))
    assert out[1, 2, 1, 0] == x_seq[1, 2, 3]

    x_map = torch.arange(2 * 3 * 2 * 3, dtype=torch.float32).reshape(2, 3, 2, 3)  # (B, C, H, W)
    to_seq = build_adapter((3, 2, 3), (3, 6), batch_norm=False)
    _identity_channels(to_seq, 3)
    assert torch.equal(to_seq(x_map), x_map.flatten(2))
    assert to_seq(x_map)[0, 1, 4] == x_map[0, 1, 1, 1]


def test_length_is_linearly_interpolated_before_the_reshape():
    to_map = build_adapter((1, 2), (1, 2, 2), batch_norm=False)  # L = 2 -> H * W = 4
    _identity_channels(to_map, 1)
    a, b = 1.0, 5.0
    out = to_map(torch.tensor([[[a, b]]]))
    # align_corners=False: sources -0.25 (clamped), 0.25, 0.75, 1.25 (clamped)
    expected = torch.tensor([[[[a, 0.75 * a + 0.25 * b], [0.25 * a + 0.75 * b, b]]]])
    assert torch.allclose(out, expected)

    to_seq = build_adapter((1, 2, 2), (1, 2), batch_norm=False)  # H * W = 4 -> L = 2
    _identity_channels(to_seq, 1)
    x = torch.tensor([[[[1.0, 3.0], [5.0, 11.0]]]])  # sequence [1, 3, 5, 11]
    assert torch.allclose(to_seq(x), torch.tensor([[[2.0, 8.0]]]))  # sources 0.5 and 2.5


# ------------------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("direction", ["to_map", "to_seq"])
def test_batch_norm_on_and_off(direction):
    torch.manual_seed(0)
    s, t = ((5, 12), (4, 3, 4)) if direction == "to_map" else ((5, 3, 4), (4, 12))
    with_bn = build_adapter(s, t, batch_norm=True).train()
    bns = [m for m in with_bn.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 1 and with_bn.proj[0].bias is None
    without = build_adapter(s, t, batch_norm=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in without.modules())
    assert without.proj[0].bias is not None
    x = 3.0 + 2.0 * torch.randn(8, *s)
    y = with_bn(x).reshape(8, 4, -1)  # L == H * W: no interpolation, per-channel stats kept
    assert torch.allclose(y.mean((0, 2)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y.var((0, 2), unbiased=False), torch.ones(4), atol=1e-3)
    assert without(x).reshape(8, 4, -1).mean((0, 2)).abs().max() > 1e-2  # not normalised


# ------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize(("s", "t"), [((3, 10), (4, 2, 3)), ((3, 2, 3), (4, 10))])
def test_gradients_reach_every_adapter_parameter_and_the_input(s, t, batch_norm):
    torch.manual_seed(0)
    adapter = build_adapter(s, t, batch_norm=batch_norm)
    x = torch.randn(4, *s, requires_grad=True)
    F.mse_loss(adapter(x), torch.randn(4, *t)).backward()
    params = list(adapter.parameters())
    assert len(params) == (3 if batch_norm else 2)  # conv weight (+ bias) / BN weight and bias
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("s", "t"), [((8,), (4, 8, 8)), ((4, 8, 8), (8,)), ((8,), (4, 10)), ((4, 10), (8,))])
def test_vector_against_a_map_or_sequence_still_raises(s, t):
    pattern = f"{re.escape(str(s))}.*{re.escape(str(t))}"  # both shapes, student first
    with pytest.raises(ShapeError, match=pattern) as err:
        build_adapter(s, t)
    assert "same kind" in str(err.value)
    assert "sequence (C, L) and a feature map (C, H, W)" in str(err.value)


def test_other_rank_mismatches_raise():
    with pytest.raises(ShapeError, match=r"\(4, 10\).*\(4, 2, 3, 3\)"):
        build_adapter((4, 10), (4, 2, 3, 3))


def test_adapters_reject_an_input_of_the_wrong_rank():
    with pytest.raises(ShapeError, match=r"SequenceToMap: expects a sequence \(B, C, L\), got .*\(2, 4, 3, 3\)"):
        build_adapter((4, 9), (2, 3, 3))(torch.randn(2, 4, 3, 3))
    with pytest.raises(ShapeError, match=r"MapToSequence: expects a feature map .*\(2, 4, 9\)"):
        build_adapter((4, 3, 3), (2, 9))(torch.randn(2, 4, 9))


# ------------------------------------------------------------- losses on cross-modal pairs
def _tiny_cnn2d() -> nn.Sequential:  # (B, 1, 8, 8) -> (B, 8, 4, 4)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
    )


def _tiny_cnn1d() -> nn.Sequential:  # (B, 1, 40) -> (B, 6, 20)
    return nn.Sequential(
        nn.Conv1d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(6, 6, 3, padding=1), nn.ReLU()
    )


def _setup(name: str, f_s: torch.Tensor, f_t: torch.Tensor, student: nn.Module, teacher: nn.Module, **kw):
    """Create loss ``name`` on taps ``s``/``t``, bind it and build it from the probed features."""
    loss = create_loss(name, student_taps=["s"], teacher_taps=["t"], **kw)
    loss.bind(student, teacher)
    loss.setup(Outputs(None, {"s": f_s}), Outputs(None, {"t": f_t}), SetupInfo())
    return loss


def test_fitnet_hint_from_a_2d_teacher_trains_a_1d_student_down():
    torch.manual_seed(0)
    teacher, student = _tiny_cnn2d().eval(), _tiny_cnn1d()
    images, sequences = torch.randn(16, 1, 8, 8), torch.randn(16, 1, 40)  # fixed inputs of each modality
    with torch.no_grad():
        hint = teacher(images)  # (16, 8, 4, 4)
    loss = _setup("fitnet", student(sequences), hint, student, teacher)
    assert isinstance(loss.regressors[0][0], SequenceToMap)  # L = 20 != H * W = 16
    params = list(student.parameters()) + list(loss.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    history = []
    for _ in range(100):
        value = loss(Outputs(None, {"s": student(sequences)}), Outputs(None, {"t": hint}), None)
        opt.zero_grad()
        value.backward()
        if not history:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params if p.dim() > 1)
        opt.step()
        history.append(value.item())
    assert history[-1] < history[0] / 5, (history[0], history[-1])  # measured: ~11x


def test_fitnet_maps_a_2d_student_onto_a_1d_teacher():
    torch.manual_seed(0)
    teacher, student = _tiny_cnn1d().eval(), _tiny_cnn2d()
    f_s, f_t = student(torch.randn(4, 1, 8, 8)), teacher(torch.randn(4, 1, 40)).detach()
    loss = _setup("fitnet", f_s, f_t, student, teacher)
    assert isinstance(loss.regressors[0][0], MapToSequence)
    value = loss(Outputs(None, {"s": f_s}), Outputs(None, {"t": f_t}), None)
    value.backward()
    assert value.item() > 0 and student[0].weight.grad.abs().sum() > 0


def test_fitnet_still_refuses_a_vector_against_a_map():
    teacher, student = _tiny_cnn2d(), _tiny_cnn1d()
    with pytest.raises(ShapeError, match=r"losses.fitnet: student tap 's' \(2, 6\) and teacher tap 't' \(2, 8, 4, 4\)"):
        _setup("fitnet", torch.randn(2, 6), torch.randn(2, 8, 4, 4), student, teacher)


@pytest.mark.parametrize("name", ["ab", "afd"])
@pytest.mark.parametrize("direction", ["to_map", "to_seq"])
def test_ab_and_afd_build_cross_rank_adapters(name, direction):
    torch.manual_seed(0)
    f_s = torch.randn(4, 6, 20) if direction == "to_map" else torch.randn(4, 6, 4, 5)
    f_t = torch.randn(4, 8, 4, 4) if direction == "to_map" else torch.randn(4, 8, 16)
    loss = _setup(name, f_s.requires_grad_(), f_t, nn.Linear(1, 1), nn.Linear(1, 1))
    adapter = (loss.connectors if name == "ab" else loss.adapters)[0]
    assert isinstance(adapter, SequenceToMap if direction == "to_map" else MapToSequence)
    batch = Batch(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), torch.arange(4))
    value = loss(Outputs(None, {"s": f_s}), Outputs(None, {"t": f_t}), batch)
    value.backward()
    assert torch.isfinite(value) and f_s.grad.abs().sum() > 0
    assert all(p.grad is not None for p in adapter.parameters())
    if name == "afd":  # the discriminator scores the teacher's shape: real and adapted fake alike
        adv = loss.adversary()
        d_loss = adv.loss(Outputs(None, {"s": f_s}), Outputs(None, {"t": f_t}), batch)
        assert torch.isfinite(d_loss)


class SequenceStudent(nn.Module):
    """Reads an image ``(B, 1, 8, 8)`` as a sequence ``(B, 1, 64)``; ``body`` -> ``(B, 6, 32)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2))
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 3)
        return self.fc(self.body(x.flatten(2)).mean(-1))


class MapTeacher(nn.Module):
    """``body``: ``(B, 1, 8, 8) -> (B, 8, 4, 4)``; logits ``(B, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _tiny_cnn2d()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


def test_fitnet_cross_rank_pair_through_the_engines_dry_run():
    torch.manual_seed(0)
    student, teacher = SequenceStudent(), MapTeacher().eval()
    loss = create_loss("fitnet", student_taps=["body"], teacher_taps=["body"])
    scheme = offline_task(student, Objective({"fitnet": loss}), teacher)
    batch = Batch(torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6))
    scheme.setup(batch, SetupInfo(num_samples=6, batch_size=6))
    assert isinstance(loss.regressors[0][0], SequenceToMap)  # probed (6, 32) -> (8, 4, 4)
    total, _ = scheme.module.train()(batch)
    total.backward()
    assert torch.isfinite(total) and total.item() > 0
    assert student.body[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
