"""Online ensemble schemes: ``kdcl`` (ensemble target), ``one`` (gated ensemble), ``codistill`` (burn-in)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, dk, results

from darkknowledge.build import check_config
from darkknowledge.config import deep_merge, load_config
from darkknowledge.data.batch import Batch
from darkknowledge.data.bundle import DatasetInfo
from darkknowledge.errors import ConfigError, ShapeError, TapError
from darkknowledge.losses.ce import cross_entropy
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.models import create_model
from darkknowledge.schemes import SCHEMES
from darkknowledge.schemes.codistill import Codistill
from darkknowledge.schemes.context import SchemeContext
from darkknowledge.schemes.kdcl import (
    KDCL,
    ensemble_teacher,
    min_logit_teacher,
    naive_teacher,
)
from darkknowledge.schemes.one import (
    ONE,
    GatedEnsemble,
    gated_logits,
    pool_feature,
    sigmoid_rampup,
)


def mlp(seed: int, hidden: tuple[int, ...] = (16,)) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", num_classes=10, input_shape=(40,), hidden=hidden)


def cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn1d", num_classes=10, input_shape=(40,), channels=8)


def batch(n: int = 12, unlabeled: int = 0) -> Batch:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (n,), generator=g)
    y[:unlabeled] = -1
    return Batch(torch.randn(n, 40, generator=g), y, torch.arange(n))


def fake_ctx(**changes) -> SchemeContext:
    """A context over the TINY recipe without loading data (models only need the data's shape)."""
    cfg = load_config(deep_merge(TINY, changes))
    session = SimpleNamespace(cfg=cfg, bundle=SimpleNamespace(info=DatasetInfo("mnist1d", 10, (40,))))
    return SchemeContext(session, cfg)  # type: ignore[arg-type]


def no_grad(model: torch.nn.Module) -> bool:
    return all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())


def has_grad(model: torch.nn.Module) -> bool:
    return all(p.grad is not None for p in model.parameters()) and any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_registered_with_citations():
    assert SCHEMES.get("kdcl") is KDCL and "Collaborative Learning" in KDCL.citation
    assert SCHEMES.get("one") is ONE and "Native Ensemble" in ONE.citation
    assert SCHEMES.get("codistill") is Codistill and "online distillation" in Codistill.citation


# ---------------------------------------------------------------- kdcl

def test_min_logit_teacher_by_hand():
    z = torch.tensor([[[2.0, 0.0, 1.0]], [[1.0, -2.0, 3.0]]])  # (N=2, B=1, K=3)
    y = torch.tensor([0])
    # margins to the true class: peer0 [0, -2, -1], peer1 [0, -3, 2] -> element-wise min [0, -3, -1]
    assert torch.equal(min_logit_teacher(z, y), torch.tensor([[0.0, -3.0, -1.0]]))


def test_min_logit_target_is_at_least_as_sure_of_the_truth_as_every_peer():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 64, 10, generator=g) * 3
    y = torch.randint(0, 10, (64,), generator=g)
    p_t = F.softmax(min_logit_teacher(z, y), -1).gather(1, y[:, None])  # (B, 1)
    p_i = F.softmax(z, -1).gather(2, y.view(1, -1, 1).expand(3, -1, 1))  # (N, B, 1)
    assert (p_t >= p_i.max(0).values - 1e-6).all()


def test_naive_teacher_picks_the_peer_with_the_lowest_ce_per_sample():
    z = torch.tensor([[[3.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [0.0, 5.0]]])  # (N=2, B=2, K=2)
    y = torch.tensor([0, 1])
    assert torch.equal(naive_teacher(z, y), torch.stack([z[0, 0], z[1, 1]]))


def test_ensemble_teacher_is_detached_and_falls_back_to_the_mean_without_labels():
    a, b = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10, requires_grad=True)
    y = torch.tensor([1, -1, 3, -1])
    for kind in ("min_logit", "naive", "mean"):
        t = ensemble_teacher([a, b], y, kind)
        assert not t.requires_grad and t.shape == (4, 10)
        assert torch.allclose(t[y == -1], ((a + b) / 2)[y == -1].detach())
    assert torch.allclose(ensemble_teacher([a, b], y, "min_logit")[0], min_logit_teacher(torch.stack([a, b])[:, :1], y[:1])[0])
    with pytest.raises(ConfigError, match=r"'median'.*min_logit, naive, mean"):
        ensemble_teacher([a, b], y, "median")


def test_kdcl_loss_and_gradients():
    b = batch(unlabeled=2)
    scheme = KDCL([mlp(0), mlp(1), mlp(2)], ensemble="min_logit", T=2.0, weight=0.5)
    loss, terms = scheme.module(b, None, 0.0)
    z = [p(b.x) for p in scheme.peers]
    target = ensemble_teacher(z, b.y, "min_logit")
    expected = sum(cross_entropy(zi, b.y) + 0.5 * kd_soft_loss(zi, target, 2.0) for zi in z)
    assert torch.allclose(loss, expected, atol=1e-6) and set(terms) == {"ce", "kl"}
    # the KL term of peer 0 alone moves peer 0 only: the ensemble target is a constant
    for p in scheme.peers:
        p.zero_grad(set_to_none=True)
    z = [p(b.x) for p in scheme.peers]
    kd_soft_loss(z[0], ensemble_teacher(z, b.y, "min_logit"), 2.0).backward()
    assert has_grad(scheme.peers[0]) and no_grad(scheme.peers[1]) and no_grad(scheme.peers[2])
    assert list(scheme.eval_models()) == ["student", "peer1", "peer2", "ensemble"]


def test_kdcl_bad_ensemble_name_fails_before_running():
    with pytest.raises(ConfigError, match=r"scheme\.params\.ensemble.*min_logit"):
        check_config(load_config(deep_merge(TINY, {"scheme": {"name": "kdcl", "params": {"ensemble": "avg"}}})))


# ---------------------------------------------------------------- one

def test_gated_logits_math_and_shapes():
    z = [torch.full((2, 3), 1.0), torch.full((2, 3), 3.0)]
    gate = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    assert torch.allclose(gated_logits(z, gate), torch.tensor([[2.0] * 3, [2.5] * 3]))
    with pytest.raises(ShapeError, match="does not match 2 peers"):
        gated_logits(z, torch.ones(2, 3) / 3)
    assert pool_feature(torch.randn(4, 8, 5)).shape == (4, 8) and pool_feature(torch.randn(4, 8)).shape == (4, 8)
    assert sigmoid_rampup(0.0, 0) == 1.0 and sigmoid_rampup(10.0, 5) == 1.0
    assert sigmoid_rampup(0.0, 5) == pytest.approx(torch.exp(torch.tensor(-5.0)).item())


def test_one_gate_is_built_in_setup_from_peer0_feature():
    scheme = ONE([cnn(0), mlp(1), mlp(2)], gate_tap="blocks.2")
    b = batch()
    with pytest.raises(RuntimeError, match="setup"):
        scheme.module(b, None, 0.0)
    scheme.setup(b)
    gate = scheme.module.gate
    assert gate.fc.in_features == 8 and gate.fc.out_features == 3  # cnn1d channels, pooled over length
    _, feature = scheme.module.outputs(b.x)
    weights = gate(feature)
    assert weights.shape == (12, 3) and torch.allclose(weights.sum(-1), torch.ones(12))
    assert not feature.requires_grad  # the gate reads a detached feature of peer 0
    assert scheme.module.taps.pop() == {}
    scheme.peers[0](b.x)  # evaluating peer 0 alone records nothing
    assert scheme.module.taps.pop() == {}
    with pytest.raises(TapError, match="blocks.9"):
        ONE([mlp(0), mlp(1)], gate_tap="blocks.9")


def test_one_loss_teacher_is_detached_in_kl_but_trained_by_its_ce():
    b = batch(unlabeled=2)
    scheme = ONE([mlp(0), mlp(1)], T=3.0, weight=1.0)
    scheme.setup(b)
    module = scheme.module
    loss, terms = module(b, None, 0.0)
    assert set(terms) == {"ce", "ce_ensemble", "kl"}
    logits, feature = module.outputs(b.x)
    z_e = gated_logits(logits, module.gate(feature))
    expected = sum(cross_entropy(z, b.y) for z in logits) + cross_entropy(z_e, b.y) + sum(
        kd_soft_loss(z, z_e.detach(), 3.0) for z in logits)
    assert torch.allclose(loss, expected, atol=1e-6)

    module.zero_grad(set_to_none=True)  # the KL terms alone: no gradient reaches the gate
    logits, feature = module.outputs(b.x)
    z_e = gated_logits(logits, module.gate(feature))
    sum(kd_soft_loss(z, z_e.detach(), 3.0) for z in logits).backward()
    assert no_grad(module.gate) and has_grad(scheme.peers[0]) and has_grad(scheme.peers[1])

    module.zero_grad(set_to_none=True)  # the ensemble's CE trains the gate and every peer through its logits
    logits, feature = module.outputs(b.x)
    cross_entropy(gated_logits(logits, module.gate(feature)), b.y).backward()
    assert has_grad(module.gate.fc) and has_grad(scheme.peers[1])

    module.zero_grad(set_to_none=True)
    loss, _ = module(b, None, 0.0)
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())  # DDP: every parameter is used


def test_one_evaluates_the_gated_teacher_and_counts_the_gate_as_extra():
    scheme = ONE([mlp(0), mlp(1), mlp(2)])
    b = batch()
    scheme.setup(b)
    models = scheme.eval_models()
    assert list(models) == ["student", "peer1", "peer2", "ensemble"]
    assert isinstance(models["ensemble"], GatedEnsemble)
    models["ensemble"].eval()
    out = models["ensemble"](b.x)
    assert out.shape == (12, 10) and not scheme.module.gate.training
    models["ensemble"].train()
    assert scheme.describe()["losses"] == ["ce", "ce_ensemble", "kl"]
    peers = sum(p.numel() for m in scheme.peers[1:] for p in m.parameters())
    gate = sum(p.numel() for p in scheme.module.gate.parameters())
    assert scheme.describe()["adapter_params"] == peers + gate
    assert len({id(p) for p in scheme.module.parameters()}) == len(list(scheme.module.parameters()))


# ---------------------------------------------------------------- codistill

def test_codistill_has_no_distillation_before_burn_in():
    b = batch()
    scheme = Codistill(mlp(0), cnn(1), T=1.0, weight=1.0, burn_in=2.0)
    loss, terms = scheme.module(b, None, 1.99)
    z = [p(b.x) for p in scheme.peers]
    assert torch.allclose(loss, cross_entropy(z[0], b.y) + cross_entropy(z[1], b.y))
    assert float(terms["kl"]) == 0.0
    loss.backward()
    grads_before = [p.grad.clone() for p in scheme.peers[0].parameters()]
    scheme.module.zero_grad(set_to_none=True)
    cross_entropy(scheme.peers[0](b.x), b.y).backward()  # the student's gradient is its CE's alone
    assert all(torch.allclose(u, p.grad) for u, p in zip(grads_before, scheme.peers[0].parameters()))

    scheme.module.zero_grad(set_to_none=True)
    loss, terms = scheme.module(b, None, 2.0)  # from the burn-in on: two-way KL
    assert float(terms["kl"]) > 0
    assert torch.allclose(loss, terms["ce"] + terms["kl"])


def test_codistill_two_way_transfer_is_detached_both_ways():
    b = batch()
    scheme = Codistill(mlp(0), cnn(1), burn_in=0.0)
    student, teacher = scheme.peers
    z_s, z_t = student(b.x), teacher(b.x)
    kd_soft_loss(z_s, z_t.detach(), 1.0).backward()  # the teacher's knowledge reaches the student only
    assert has_grad(student) and no_grad(teacher)
    assert list(scheme.eval_models()) == ["student", "teacher_peer"] and scheme.export_model() is student


def test_codistill_builds_the_teacher_architecture_untrained():
    ctx = fake_ctx(scheme="codistill")
    scheme = Codistill.build(ctx, 0)
    assert type(scheme.peers[1]).__name__ == "CNN1d" and scheme.peers[1].dk_params["channels"] == 16
    baseline = ctx.student(0)
    assert all(torch.equal(u, v) for u, v in zip(scheme.peers[0].state_dict().values(), baseline.state_dict().values()))
    with pytest.raises(ConfigError, match="needs a `teacher:` section"):
        Codistill.build(fake_ctx(scheme="codistill", teacher=None), 0)
    with pytest.raises(ConfigError, match=r"from scratch, but teacher.checkpoint is 't.pt'"):
        Codistill.build(fake_ctx(scheme="codistill", teacher={"checkpoint": "t.pt"}), 0)


# ---------------------------------------------------------------- end to end

SMALL = ["seeds=[0]", "train.epochs=2", "data.params.num_samples=600", "data.params.transfer_samples=0"]


@pytest.mark.slow
@pytest.mark.parametrize("scheme,rows", [
    ("kdcl", ["kdcl-s0:peer1", "kdcl-s0:ensemble"]),
    ("one", ["one-s0:peer1", "one-s0:peer2", "one-s0:ensemble"]),
    ("codistill", ["codistill-s0:teacher_peer"]),
])
def test_recipe_runs(tmp_path, scheme, rows):
    ran = dk("run", scheme, *SMALL, "--out", "run", "--quiet", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    res = results(tmp_path / "run")
    assert {"baseline-s0", f"{scheme}-s0", *rows} <= set(res)
    assert res[f"{scheme}-s0"]["steps"] == res["baseline-s0"]["steps"]  # same budget as the baseline
    assert not any(e["role"] == "teacher" for e in res.values())  # online: no pre-trained teacher
    assert (tmp_path / "run" / f"{scheme}-s0" / "model.pt").is_file()
