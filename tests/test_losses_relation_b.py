"""PKT, FSP, IRG and ICKD: math on hand-checkable tensors, training on mismatched models, options."""

import math

import numpy as np
import pytest
import torch

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses import create_loss
from darkknowledge.losses.fsp import fsp_loss, fsp_matrix
from darkknowledge.losses.ickd import icc_matrix, ickd_loss
from darkknowledge.losses.irg import edge_matrix, irg_loss, vertex_transform
from darkknowledge.losses.objective import Objective
from darkknowledge.losses.pkt import pkt_loss
from darkknowledge.models import create_model
from darkknowledge.schemes.offline import offline_task

torch.set_num_threads(1)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- PKT
def test_pkt_identical_is_zero_and_dims_may_differ():
    f = torch.randn(8, 5, generator=_gen())
    assert pkt_loss(f, f.clone()).abs().item() < 1e-6
    assert pkt_loss(torch.randn(8, 3, generator=_gen(1)), f).item() > 1e-4  # (B, 3) vs (B, 5)


def test_pkt_is_invariant_to_positive_scaling_of_each_feature():
    g = _gen(2)
    f_s, f_t = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 7, generator=g, dtype=torch.float64)
    scale = torch.rand(6, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    assert torch.allclose(pkt_loss(f_s, f_t), pkt_loss(f_s * scale, f_t * 3.0), atol=1e-9)


def test_pkt_matches_a_hand_computed_three_sample_value():
    s = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])

    def conditional(f):
        k = np.zeros((3, 3))
        for i in range(3):
            for j in range(3):
                cos = f[i] @ f[j] / (np.linalg.norm(f[i]) * np.linalg.norm(f[j]))
                k[i, j] = (cos + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    p, q = conditional(t), conditional(s)
    expected = sum(p[i, j] * math.log(p[i, j] / q[i, j]) for i in range(3) for j in range(3)) / 9
    got = pkt_loss(torch.tensor(s), torch.tensor(t)).item()
    assert got == pytest.approx(expected, abs=1e-6)
    # e.g. row 0 of the student: cos = (1, 0, 1/sqrt2) -> K = (1, .5, .854), q_{.|0} = K / 2.354
    assert q[0, 1] == pytest.approx(0.5 / (1.5 + (1 + 1 / math.sqrt(2)) / 2), abs=1e-9)


# ----------------------------------------------------------------------------- FSP
def test_fsp_matrix_matches_a_loop_and_pools_the_larger_map():
    g = _gen(3)
    f1 = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)  # (B, C1, L=8)
    f2 = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)  # (B, C2, L=4)
    pooled = f1.reshape(2, 3, 4, 2).mean(-1)  # adaptive avg pool 8 -> 4 = mean of pairs
    expected = torch.zeros(2, 3, 4, dtype=torch.float64)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                expected[b, i, j] = sum(pooled[b, i, x] * f2[b, j, x] for x in range(4)) / 4
    assert torch.allclose(fsp_matrix(f1, f2), expected)
    m1, m2 = torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 3, 4, 4, generator=g)
    assert torch.allclose(fsp_matrix(m1, m2)[0, 1, 2], (m1[0, 1] * m2[0, 2]).mean(), atol=1e-6)


def test_fsp_identical_is_zero_and_sums_consecutive_pairs():
    g = _gen(4)
    feats = [torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 2, generator=g)]
    assert fsp_loss(feats, [f.clone() for f in feats]).item() == 0.0
    other = [torch.randn_like(f) for f in feats]
    by_hand = sum(
        (fsp_matrix(feats[k], feats[k + 1]) - fsp_matrix(other[k], other[k + 1])).pow(2).mean() for k in range(2)
    )
    assert torch.allclose(fsp_loss(feats, other), by_hand)
    with pytest.raises(ShapeError, match=r"\(3, 2\)"):
        fsp_matrix(torch.randn(3, 2), torch.randn(3, 2))


# ----------------------------------------------------------------------------- IRG
def test_irg_edge_matrix_matches_a_loop():
    f = torch.randn(5, 3, 2, generator=_gen(5), dtype=torch.float64)
    x = f.flatten(1)
    d = torch.tensor([[float(((x[i] - x[j]) ** 2).sum()) for j in range(5)] for i in range(5)], dtype=torch.float64)
    assert torch.allclose(edge_matrix(f), d / d.max(), atol=1e-10)
    assert torch.allclose(edge_matrix(f * 7.0), edge_matrix(f), atol=1e-10)  # max-normalized: scale-free


def test_irg_identical_is_zero_and_terms_by_hand():
    g = _gen(6)
    feats = [torch.randn(4, 3, 4, generator=g), torch.randn(4, 6, generator=g)]
    z = torch.randn(4, 5, generator=g)
    assert irg_loss(feats, [f.clone() for f in feats], z, z.clone()).abs().item() < 1e-7
    other, z2 = [torch.randn_like(f) for f in feats], torch.randn_like(z)
    vertex = ((z - z2) ** 2).mean()
    assert torch.allclose(irg_loss(feats, other, z, z2, (1.0, 0.0, 0.0)), vertex)
    edges = sum(((edge_matrix(a) - edge_matrix(b)) ** 2).mean() for a, b in zip(feats + [z], other + [z2]))
    assert torch.allclose(irg_loss(feats, other, z, z2, (0.0, 1.0, 0.0)), edges)
    theta_s = ((edge_matrix(feats[0]) - edge_matrix(feats[1])) ** 2).mean()
    theta_t = ((edge_matrix(other[0]) - edge_matrix(other[1])) ** 2).mean()
    assert torch.allclose(irg_loss(feats, other, z, z2, (0.0, 0.0, 1.0)), (theta_s - theta_t) ** 2)


def test_irg_vertex_transformation_needs_equal_sizes():
    g = _gen(7)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    lam = ((a - b) ** 2).sum(1)
    assert torch.allclose(vertex_transform(a, b), lam / lam.max())
    with pytest.raises(ShapeError, match="equal size"):
        vertex_transform(a, torch.randn(4, 5))
    with pytest.raises(ShapeError, match="vertex"):  # blocks.1 (4, 20) -> blocks.2 (4, 10)
        _setup_vertex_mismatch()
    student = create_model("cnn1d", input_shape=(40,), channels=4, depth=2)
    teacher = create_model("cnn1d", input_shape=(40,), channels=8, depth=3)
    # default taps: last stage (C, L) and its flattened copy fc:input, equal sizes on each side
    _train_step({"irg": {"transform": "vertex"}}, student, teacher, _batch1d())


def _setup_vertex_mismatch():
    student = create_model("cnn1d", input_shape=(40,), channels=4, depth=3)
    teacher = create_model("cnn1d", input_shape=(40,), channels=8, depth=3)
    loss = {
        "irg": {
            "transform": "vertex",
            "student_taps": ["blocks.1", "blocks.2"],
            "teacher_taps": ["blocks.1", "blocks.2"],
        }
    }
    offline_task(student, Objective.from_config(loss), teacher).setup(_batch1d())


# ----------------------------------------------------------------------------- ICKD
def test_icc_matches_a_loop_and_ickd_value():
    g = _gen(8)
    f = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    raw = torch.zeros(2, 3, 3, dtype=torch.float64)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                raw[b, i, j] = sum(f[b, i, x] * f[b, j, x] for x in range(4))
    assert torch.allclose(icc_matrix(f, normalize=False), raw / 4)
    rows = raw / raw.norm(dim=2, keepdim=True)
    assert torch.allclose(icc_matrix(f), rows)
    f_t = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)  # other spatial size, same channels
    t_rows = icc_matrix(f_t)
    assert torch.allclose(ickd_loss(f, f_t), ((rows - t_rows) ** 2).sum() / (2 * 3))
    assert ickd_loss(f, f.clone()).item() < 1e-12 and ickd_loss(f, 2.5 * f).item() < 1e-12


def test_ickd_rejects_vector_taps():
    student = create_model("mlp", input_shape=(40,), hidden=[16])
    teacher = create_model("cnn1d", input_shape=(40,), channels=8)
    scheme = offline_task(student, Objective.from_config({"ickd": {"student_taps": ["fc:input"]}}), teacher)
    with pytest.raises(ShapeError, match=r"student tap 'fc:input' has shape \(6, 16\)"):
        scheme.setup(_batch1d())


# ------------------------------------------------------------------ training on mismatched models
def _batch1d(n=6):
    return Batch(torch.randn(n, 40, generator=_gen(9)), torch.tensor([0, 1, 2, 3, 4, 0][:n]), torch.arange(n))


def _train_step(losses, student, teacher, batch):
    scheme = offline_task(student, Objective.from_config(losses), teacher)
    scheme.setup(batch)
    module = scheme.module.train()
    loss, _ = module(batch)
    assert loss.dim() == 0 and math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    student_grads = [p.grad for p in module.student.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in student_grads)
    return module


@pytest.mark.parametrize("name", ["fsp", "ickd"])
def test_adapter_methods_train_across_widths_and_lengths(name):
    torch.manual_seed(0)
    student = create_model("cnn1d", input_shape=(40,), channels=4, depth=2)  # (4, 40), (4, 20)
    teacher = create_model("cnn1d", input_shape=(40,), channels=8, depth=3)  # (8, 40), (8, 20), (8, 10)
    module = _train_step({name: {}, "ce": {}}, student, teacher, _batch1d())
    adapters = list(module.objective.terms[name].parameters())
    assert adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters[:1])


@pytest.mark.parametrize("name", ["pkt", "irg"])
def test_relation_methods_train_across_models(name):
    torch.manual_seed(0)
    student = create_model("cnn2d", input_shape=(1, 8, 8), num_classes=5, channels=(4, 8), hidden=16)
    teacher = create_model("cnn2d", input_shape=(1, 8, 8), num_classes=5, channels=(8, 16, 32), hidden=0)
    x = torch.randn(6, 1, 8, 8, generator=_gen(10))
    _train_step({name: {}}, student, teacher, Batch(x, torch.tensor([0, 1, 2, 3, 4, 0]), torch.arange(6)))


# ----------------------------------------------------------------------------- options
def test_fsp_channel_mismatch_error_option_and_needs_two_taps():
    student = create_model("cnn1d", input_shape=(40,), channels=4, depth=2)
    teacher = create_model("cnn1d", input_shape=(40,), channels=8, depth=3)
    scheme = offline_task(student, Objective.from_config({"fsp": {"channel_mismatch": "error"}}), teacher)
    with pytest.raises(
        ShapeError, match=r"'blocks.0' \(6, 4, 40\) has 4 channels but teacher tap 'blocks.1' \(6, 8, 20\)"
    ):
        scheme.setup(_batch1d())
    same = create_model("cnn1d", input_shape=(40,), channels=8, depth=2)  # same width: no adapters at all
    teacher = create_model("cnn1d", input_shape=(40,), channels=8, depth=3)  # fresh hooks after the failed setup
    loss = {
        "fsp": {
            "channel_mismatch": "error",
            "student_taps": ["blocks.0", "blocks.1"],
            "teacher_taps": ["blocks.0", "blocks.2"],
        }
    }
    module = _train_step(loss, same, teacher, _batch1d())
    assert not list(module.objective.terms["fsp"].parameters())
    with pytest.raises(ConfigError, match="at least 2"):
        one_pair = {"fsp": {"student_taps": ["blocks.1"], "teacher_taps": ["blocks.2"]}}
        offline_task(student, Objective.from_config(one_pair), teacher)
    with pytest.raises(ConfigError, match="channel_mismatch"):
        create_loss("fsp", channel_mismatch="pad")


def test_fsp_stage_then_task_with_term_windows():
    obj = Objective.from_config({"fsp": {"stop_epoch": 3}, "ce": {"start_epoch": 3}})
    assert obj.schedules["fsp"](0.0) == 1.0 and obj.schedules["fsp"](3.0) == 0.0
    assert obj.schedules["ce"](2.9) == 0.0 and obj.schedules["ce"](3.0) == 1.0


def test_irg_weights_and_transform_options():
    student = create_model("cnn1d", input_shape=(40,), channels=4, depth=3)
    teacher = create_model("cnn1d", input_shape=(40,), channels=8, depth=3)
    taps = {"student_taps": ["blocks.1", "blocks.2"], "teacher_taps": ["blocks.1", "blocks.2"]}
    loss = create_loss("irg", vertex_weight=0.0, edge_weight=0.0, transform_weight=2.0, **taps)
    assert loss.weights == (0.0, 0.0, 2.0) and loss.transform == "edge"
    module = _train_step({"irg": {"vertex_weight": 0.5, "transform_weight": 3.0, **taps}}, student, teacher, _batch1d())
    assert module.objective.terms["irg"].pairs == [("blocks.1", "blocks.1"), ("blocks.2", "blocks.2")]
    default = offline_task(student, Objective.from_config({"irg": {}}), teacher)
    needs = default.flow.objective.needs
    assert needs.student_taps == ("blocks.2", "fc:input") and needs.teacher_logits
    with pytest.raises(ConfigError, match="transform"):
        create_loss("irg", transform="both")
