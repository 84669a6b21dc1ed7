"""Online ensemble schemes: ``kdcl`` (ensemble target), ``one`` (gated ensemble), ``codistill`` (burn-in)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from darkknowledge.config import deep_merge, load_config
from darkknowledge.data.batch import Batch
from darkknowledge.data.bundle import DatasetInfo
from darkknowledge.errors import ConfigError, ShapeError, TapError
from darkknowledge.losses.base import Outputs
from darkknowledge.losses.ce import cross_entropy
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.losses.objective import TermSchedule
from darkknowledge.runs.build import check_config
from darkknowledge.runs.context import RunContext
from darkknowledge.schemes import SCHEMES
from darkknowledge.schemes.codistill import Codistill
from darkknowledge.schemes.kdcl import KDCL
from darkknowledge.schemes.one import ONE, GatedEnsemble, gated_logits, pool_feature
from darkknowledge.schemes.task import FlowTask
from darkknowledge.teachers.ensemble import Ensemble, ensemble_teacher, min_logit_teacher, naive_teacher
from helpers import TINY, dk, results

MLP = {"name": "mlp", "params": {"hidden": [16]}}
CNN = {"name": "cnn1d", "params": {"channels": 8}}


def batch(n: int = 12, unlabeled: int = 0) -> Batch:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (n,), generator=g)
    y[:unlabeled] = -1
    return Batch(torch.randn(n, 40, generator=g), y, torch.arange(n))


def fake_ctx(scheme: str, losses: dict[str, Any] | None = None, **changes: Any) -> RunContext:
    """A context over the TINY recipe without loading data (models only need the data's shape)."""
    raw = deep_merge(TINY, {"scheme": scheme, **changes})
    raw["losses"] = losses if losses is not None else {"ce": {}, "kd": {"T": 3.0, "alpha": 1.0}}
    cfg = load_config(raw)
    session = SimpleNamespace(cfg=cfg, bundle=SimpleNamespace(info=DatasetInfo("mnist1d", 10, (40,))))
    return RunContext(session, cfg)  # type: ignore[arg-type]


def peers_of(task: FlowTask, names: list[str] | None = None) -> list[torch.nn.Module]:
    return [task.flow.get_submodule(n) for n in (names or task.flow.view_names)]


def no_grad(model: torch.nn.Module) -> bool:
    return all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())


def has_grad(model: torch.nn.Module) -> bool:
    return all(p.grad is not None for p in model.parameters()) and any(
        p.grad.abs().sum() > 0 for p in model.parameters()
    )


def test_registered_with_citations():
    assert SCHEMES.get("kdcl") is KDCL and "Collaborative Learning" in KDCL.citation
    assert SCHEMES.get("one") is ONE and "Native Ensemble" in ONE.citation
    assert SCHEMES.get("codistill") is Codistill and "online distillation" in Codistill.citation


@pytest.mark.parametrize("scheme", ["kdcl", "one", "codistill"])
@pytest.mark.parametrize(
    "key,where",
    [
        ("T", r"losses\.<term>\.T"),
        ("weight", r"losses\.<term>\.weight"),
        ("burn_in", r"losses\.<term>\.start_epoch"),
        ("rampup", r"losses\.<term>\.warmup_epochs"),
    ],
)
def test_loss_params_moved_to_the_losses_are_refused(scheme, key, where):
    cfg = load_config(deep_merge(TINY, {"scheme": {"name": scheme, "params": {key: 1.0}}}))
    with pytest.raises(
        ConfigError, match=rf"scheme\.params\.{key}: not a parameter of scheme '{scheme}' any more; .*{where}"
    ):
        check_config(cfg)


@pytest.mark.parametrize("scheme", ["kdcl", "one", "codistill"])
def test_an_objective_that_reads_no_teacher_is_refused(scheme):
    cls = SCHEMES.get(scheme)
    with pytest.raises(ConfigError, match=rf"scheme '{scheme}': none of the losses \['ce'\] reads a teacher"):
        cls.task(fake_ctx(scheme, {"ce": {}}), 0, cls.Params())


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
    assert torch.allclose(
        ensemble_teacher([a, b], y, "min_logit")[0], min_logit_teacher(torch.stack([a, b])[:, :1], y[:1])[0]
    )
    with pytest.raises(ConfigError, match=r"'median'.*min_logit, naive, mean"):
        ensemble_teacher([a, b], y, "median")
    with pytest.raises(ConfigError, match=r"'median'.*min_logit, naive, mean"):
        Ensemble(["student", "peer1"], None, kind="median")


def test_kdcl_loss_and_gradients():
    b = batch(unlabeled=2)
    ctx = fake_ctx("kdcl", {"ce": {}, "kd": {"T": 2.0, "alpha": 1.0, "weight": 0.5}})
    task = KDCL.task(ctx, 0, KDCL.Params(n=3, ensemble="min_logit"))
    peers = peers_of(task)
    assert len(peers) == 3 and [type(t) for t in task.teachers] == [Ensemble]  # one ensemble teaches every peer
    loss, terms = task.module(b, 0.0)
    z = [p(b.x) for p in peers]
    target = ensemble_teacher(z, b.y, "min_logit")
    expected = sum(cross_entropy(zi, b.y) + 0.5 * kd_soft_loss(zi, target, 2.0) for zi in z)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert set(terms) == {"ce", "kd", "ce@peer1", "kd@peer1", "ce@peer2", "kd@peer2"}
    views = task.flow.compute_views(b)
    out = task.teachers[0](b, views)
    assert not out.logits.requires_grad and torch.allclose(out.logits, target)
    # the terms of peer k alone move peer k only: the ensemble target is a constant
    for k, link in enumerate(task.flow.links):
        task.module.zero_grad(set_to_none=True)
        link(task.flow.compute_views(b), b, 0.0)[0].backward()
        assert link.view == task.flow.view_names[k] and has_grad(peers[k])
        assert all(no_grad(p) for j, p in enumerate(peers) if j != k)
    assert list(task.eval_models()) == ["student", "peer1", "peer2", "ensemble"]


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
    # ONE's sigmoid ramp-up of the KL weight is the term's schedule now
    ramp = TermSchedule(warmup_epochs=5, warmup_shape="sigmoid")
    assert TermSchedule(warmup_shape="sigmoid")(0.0) == 1.0 and ramp(10.0) == 1.0
    assert ramp(0.0) == pytest.approx(math.exp(-5.0))


def test_one_gate_is_built_in_setup_from_peer0_feature():
    task = ONE.task(fake_ctx("one"), 0, ONE.Params(peers=[CNN, MLP, MLP], gate_tap="blocks.2"))
    flow, b = task.flow, batch()
    assert flow.gate is None  # built by the dry run, like an adapter (and as the authors' code orders it)
    with pytest.raises(RuntimeError, match="setup"):
        flow(b, 0.0)
    task.setup(b)
    gate = flow.gate
    assert gate.fc.in_features == 8 and gate.fc.out_features == 3  # cnn1d channels, pooled over length
    assert {id(p) for p in gate.parameters()} <= {id(p) for p in task.module.parameters()}  # trained with the peers
    views = flow.compute_views(b)
    feature = pool_feature(views["student"].feature("blocks.2"))
    weights = gate(feature)
    assert weights.shape == (12, 3) and torch.allclose(weights.sum(-1), torch.ones(12))
    assert torch.allclose(views["ensemble"].logits, gated_logits([views[v].logits for v in flow.peer_views], weights))
    # the gate reads a detached feature of peer 0: the ensemble's CE through the gate alone leaves peer 0 untouched
    frozen = {v: Outputs(logits=views[v].logits.detach(), features=views[v].features) for v in flow.peer_views}
    cross_entropy(flow.ensemble(frozen).logits, b.y).backward()
    assert no_grad(flow.student) and has_grad(gate.fc)
    assert flow.taps["student"].pop() == {}
    flow.student(b.x)  # evaluating peer 0 alone records nothing
    assert flow.taps["student"].pop() == {}
    with pytest.raises(TapError, match="blocks.9"):
        ONE.task(fake_ctx("one"), 0, ONE.Params(n=2, gate_tap="blocks.9"))


def test_one_loss_teacher_is_detached_in_kd_but_trained_by_its_ce():
    b = batch(unlabeled=2)
    task = ONE.task(fake_ctx("one", {"ce": {}, "kd": {"T": 3.0, "alpha": 1.0}}), 0, ONE.Params(n=2))
    task.setup(b)
    flow = task.flow
    peers = peers_of(task, flow.peer_views)
    loss, terms = flow(b, 0.0)
    assert set(terms) == {"ce", "kd", "ce@peer1", "kd@peer1", "ce@ensemble"}
    views = flow.compute_views(b)
    logits, z_e = [views[v].logits for v in flow.peer_views], views["ensemble"].logits
    expected = (
        sum(cross_entropy(z, b.y) for z in logits)
        + cross_entropy(z_e, b.y)
        + sum(kd_soft_loss(z, z_e.detach(), 3.0) for z in logits)
    )
    assert torch.allclose(loss, expected, atol=1e-6)

    for k, name in enumerate(flow.peer_views):  # a peer's kd term alone: no gradient reaches the gate or other peers
        flow.zero_grad(set_to_none=True)
        link = next(link for link in flow.links if link.view == name)
        views = flow.compute_views(b)
        teacher = link.teacher(b, views)
        assert not teacher.logits.requires_grad and torch.equal(teacher.logits, views["ensemble"].logits)
        link.objective.terms["kd"](views[name], teacher, b).backward()
        assert no_grad(flow.gate) and has_grad(peers[k]) and no_grad(peers[1 - k])

    flow.zero_grad(set_to_none=True)  # the ensemble's CE trains the gate and every peer through its logits
    (link,) = [link for link in flow.links if link.view == "ensemble"]
    assert link.teacher is None and list(link.objective.terms) == ["ce"]
    link(flow.compute_views(b), b, 0.0)[0].backward()
    assert has_grad(flow.gate.fc) and has_grad(peers[1])

    flow.zero_grad(set_to_none=True)
    loss, _ = flow(b, 0.0)
    loss.backward()
    assert all(p.grad is not None for p in flow.parameters())  # DDP: every parameter is used


def test_one_evaluates_the_gated_teacher_and_counts_the_gate_as_extra():
    task = ONE.task(fake_ctx("one"), 0, ONE.Params(n=3))
    flow, b = task.flow, batch()
    task.setup(b)
    models = task.eval_models()
    assert list(models) == ["student", "peer1", "peer2", "ensemble"]
    assert isinstance(models["ensemble"], GatedEnsemble)
    models["ensemble"].eval()
    out = models["ensemble"](b.x)
    assert out.shape == (12, 10) and not flow.gate.training
    with torch.no_grad():
        assert torch.allclose(out, flow.compute_views(b)["ensemble"].logits)  # the row is z_e itself
    models["ensemble"].train()
    assert task.describe()["losses"] == ["ce@ensemble", "ce", "kd", "ce@peer1", "kd@peer1", "ce@peer2", "kd@peer2"]
    peers = sum(p.numel() for m in peers_of(task)[1:] for p in m.parameters())
    gate = sum(p.numel() for p in flow.gate.parameters())
    assert task.describe()["adapter_params"] == peers + gate
    assert len({id(p) for p in flow.parameters()}) == len(list(flow.parameters()))


def test_one_needs_a_term_for_the_ensemble():
    with pytest.raises(ConfigError, match=r"none of the losses \['kd'\] is one; add ce"):
        ONE.task(fake_ctx("one", {"kd": {"T": 3.0, "alpha": 1.0}}), 0, ONE.Params())


# ---------------------------------------------------------------- codistill


def codistill(**kd: Any) -> FlowTask:
    ctx = fake_ctx("codistill", {"ce": {}, "kd": {"T": 1.0, "alpha": 1.0, **kd}})
    return Codistill.task(ctx, 0, Codistill.Params())


def test_codistill_has_no_distillation_before_burn_in():
    b = batch()
    task = codistill(start_epoch=2.0)
    peers = peers_of(task)
    loss, _ = task.module(b, 1.99)
    z = [p(b.x) for p in peers]
    assert torch.allclose(loss, cross_entropy(z[0], b.y) + cross_entropy(z[1], b.y))
    loss.backward()
    grads_before = [p.grad.clone() for p in peers[0].parameters()]
    task.module.zero_grad(set_to_none=True)
    cross_entropy(peers[0](b.x), b.y).backward()  # the student's gradient is its CE's alone
    assert all(torch.allclose(u, p.grad) for u, p in zip(grads_before, peers[0].parameters()))

    task.module.zero_grad(set_to_none=True)
    loss, terms = task.module(b, 2.0)  # from the burn-in on: two-way KD
    assert float(terms["kd"]) > 0 and float(terms["kd@teacher_peer"]) > 0
    assert torch.allclose(loss, terms["ce"] + terms["kd"] + terms["ce@teacher_peer"] + terms["kd@teacher_peer"])


def test_codistill_two_way_transfer_is_detached_both_ways():
    b = batch()
    task = codistill()
    student, teacher = peers_of(task)
    assert task.flow.view_names == ["student", "teacher_peer"]
    for link, taught, other in zip(task.flow.links, (student, teacher), (teacher, student)):
        task.module.zero_grad(set_to_none=True)
        link(task.flow.compute_views(b), b, 0.0)[0].backward()  # each one's knowledge reaches the other only
        assert has_grad(taught) and no_grad(other)
    assert list(task.eval_models()) == ["student", "teacher_peer"] and task.export_model() is student


def test_codistill_builds_the_teacher_architecture_untrained():
    ctx = fake_ctx("codistill")
    task = Codistill.task(ctx, 0, Codistill.Params())
    teacher = task.flow.teacher_peer
    assert type(teacher).__name__ == "CNN1d" and teacher.dk_params["channels"] == 16
    baseline = ctx.student(0)
    assert all(
        torch.equal(u, v) for u, v in zip(task.flow.student.state_dict().values(), baseline.state_dict().values())
    )
    with pytest.raises(ConfigError, match="needs a `teacher:` section"):
        Codistill.task(fake_ctx("codistill", teacher=None), 0, Codistill.Params())
    with pytest.raises(ConfigError, match=r"from scratch, but teacher.checkpoint is 't.pt'"):
        Codistill.task(fake_ctx("codistill", teacher={"checkpoint": "t.pt"}), 0, Codistill.Params())


# ---------------------------------------------------------------- end to end

SMALL = ["seeds=[0]", "train.epochs=2", "data.params.num_samples=600", "data.params.transfer_samples=0"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "scheme,rows",
    [
        ("kdcl", ["kdcl-s0:peer1", "kdcl-s0:ensemble"]),
        ("one", ["one-s0:peer1", "one-s0:peer2", "one-s0:ensemble"]),
        ("codistill", ["codistill-s0:teacher_peer"]),
    ],
)
def test_recipe_runs(tmp_path, scheme, rows):
    ran = dk("run", scheme, *SMALL, "--out", "run", "--quiet", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    res = results(tmp_path / "run")
    assert {"baseline-s0", f"{scheme}-s0", *rows} <= set(res)
    assert res[f"{scheme}-s0"]["steps"] == res["baseline-s0"]["steps"]  # same budget as the baseline
    assert not any(e["role"] == "teacher" for e in res.values())  # online: no pre-trained teacher
    assert (tmp_path / "run" / f"{scheme}-s0" / "model.pt").is_file()
