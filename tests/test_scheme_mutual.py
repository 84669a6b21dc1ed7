"""Deep mutual learning (``mutual``): who teaches whom, what is detached, cohorts, errors, runs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from darkknowledge.commands import evaluate_checkpoint
from darkknowledge.config import deep_merge, load_config
from darkknowledge.data.batch import Batch
from darkknowledge.data.bundle import DatasetInfo
from darkknowledge.engine.checkpoint import load_exported
from darkknowledge.errors import ConfigError, RegistryError, ShapeError
from darkknowledge.losses.ce import cross_entropy
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.models import count_params, create_model
from darkknowledge.models.ensemble import ProbabilityEnsemble
from darkknowledge.runs.build import check_config
from darkknowledge.runs.context import RunContext
from darkknowledge.schemes import SCHEMES
from darkknowledge.schemes.cohort import build_peers, peer_names, peer_seed
from darkknowledge.schemes.mutual import Mutual, mutual_task
from darkknowledge.schemes.task import FlowTask
from darkknowledge.teachers.peers import Peer
from helpers import ONE_THREAD, TINY, dk, results, torchrun, write_recipe

DML = {"ce": {}, "kd": {"T": 1.0, "alpha": 1.0}}  # the paper's L_Ck + D_KL(p_l || p_k)


def mlp(seed: int, hidden: tuple[int, ...] = (16,)) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", num_classes=10, input_shape=(40,), hidden=hidden)


def batch(n: int = 12, unlabeled: int = 0) -> Batch:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (n,), generator=g)
    y[:unlabeled] = -1
    return Batch(torch.randn(n, 40, generator=g), y, torch.arange(n))


def grads(model: torch.nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def fake_ctx(losses: dict[str, Any] | None = None, **changes: Any) -> RunContext:
    """A context over the TINY recipe without loading data (models only need the data's shape)."""
    raw = deep_merge(TINY, changes)
    raw["losses"] = losses if losses is not None else DML
    cfg = load_config(raw)
    session = SimpleNamespace(cfg=cfg, bundle=SimpleNamespace(info=DatasetInfo("mnist1d", 10, (40,))))
    return RunContext(session, cfg)  # type: ignore[arg-type]


def cohort(peers: list[torch.nn.Module], losses: dict[str, Any] | None = None) -> FlowTask:
    return mutual_task(fake_ctx(losses, scheme="mutual"), peers, peer_names(len(peers)))


def peers_of(task: FlowTask) -> list[torch.nn.Module]:
    return [task.flow.get_submodule(name) for name in task.flow.view_names]


@pytest.fixture()
def ctx() -> RunContext:
    return fake_ctx(scheme="mutual")


def test_registered_with_citation():
    cls = SCHEMES.get("mutual")
    assert cls is Mutual and "Deep Mutual Learning" in cls.citation and cls.summary


def test_each_peer_teaches_the_others_detached():
    task = cohort([mlp(0), mlp(1), mlp(2)])
    peers, b = peers_of(task), batch()
    for name in ("student", "peer1", "peer2"):  # every other peer is a teacher, as a detached online view
        views = [link.teacher.view for link in task.flow.links if link.view == name and link.teacher is not None]
        assert sorted(views) == sorted(n for n in task.flow.view_names if n != name)
    assert all(isinstance(t, Peer) for t in task.teachers) and len(task.teachers) == 3
    for link in task.flow.links:  # the terms of one peer never reach another peer
        task.module.zero_grad(set_to_none=True)
        loss, _ = link(task.flow.compute_views(b), b, 0.0)
        loss.backward()
        k = task.flow.view_names.index(link.view)
        assert all(g is not None and g.abs().sum() > 0 for g in grads(peers[k]))
        assert all(g is None for j, p in enumerate(peers) if j != k for g in grads(p)), link.view


def test_peer_gradient_depends_on_the_others_outputs():
    b = batch()

    def peer0_grad(other_seed: int) -> list[torch.Tensor]:
        task = cohort([mlp(0), mlp(other_seed)])
        loss, _ = task.module(b, 0.0)
        loss.backward()
        return grads(task.flow.student)

    g1, g1_again, g2 = peer0_grad(1), peer0_grad(1), peer0_grad(2)
    assert all(torch.equal(u, v) for u, v in zip(g1, g1_again))
    assert any(not torch.allclose(u, v) for u, v in zip(g1, g2))  # a different peer 1 teaches peer 0 differently


def test_cohort_loss_gives_each_peer_exactly_its_own_dml_gradient():
    b = batch(unlabeled=3)
    task = cohort([mlp(0), mlp(1), mlp(2)], {"ce": {}, "kd": {"T": 2.0, "alpha": 1.0, "weight": 0.7}})
    loss, terms = task.module(b, 0.0)
    loss.backward()
    peers = peers_of(task)
    joint = [grads(p) for p in peers]
    for k in range(3):
        for p in peers:
            p.zero_grad(set_to_none=True)
        z = [p(b.x) for p in peers]
        others = [z[j].detach() for j in range(3) if j != k]
        own = cross_entropy(z[k], b.y) + 0.7 * sum(kd_soft_loss(z[k], t, 2.0) for t in others) / 2  # L_thetak
        own.backward()
        assert all(g is None for j, p in enumerate(peers) if j != k for g in grads(p))
        assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(joint[k], grads(peers[k])))
    assert set(terms) == {"ce", "kd", "ce@peer1", "kd@peer1", "ce@peer2", "kd@peer2"}
    assert all(float(terms[k]) > 0 for k in ("kd", "kd@peer1", "kd@peer2"))
    z = [p(b.x).detach() for p in peers]  # a reported kd value: the mean over the peer's teachers
    assert float(terms["kd"]) == pytest.approx(float(sum(kd_soft_loss(z[0], t, 2.0) for t in z[1:]) / 2), rel=1e-5)


def test_identical_peers_have_zero_kd():
    _, terms = cohort([mlp(0), mlp(0)]).module(batch(), 0.0)
    assert float(terms["kd"]) == pytest.approx(0.0, abs=1e-7)
    assert float(terms["kd@peer1"]) == pytest.approx(0.0, abs=1e-7)


def test_cohort_of_three_with_different_architectures():
    torch.manual_seed(3)
    cnn = create_model("cnn1d", num_classes=10, input_shape=(40,), channels=8)
    peers = [mlp(0), cnn, mlp(2, hidden=(8, 8))]
    task = cohort(peers)
    b = batch()
    task.setup(b)
    loss, _ = task.module(b, 0.0)
    loss.backward()
    assert all(p.grad is not None for p in task.module.parameters())  # DDP: every parameter is used
    models = task.eval_models()
    assert list(models) == ["student", "peer1", "peer2", "ensemble"]
    assert models["peer1"] is cnn and task.export_model() is peers[0]
    assert task.describe() == {
        "losses": ["ce", "kd", "ce@peer1", "kd@peer1", "ce@peer2", "kd@peer2"],
        "adapter_params": count_params(cnn) + count_params(peers[2]),
    }


def test_feature_losses_get_one_set_of_adapters_per_pair_of_peers():
    losses = {"ce": {}, "fitnet": {"student_taps": ["fc:input"], "teacher_taps": ["fc:input"]}}
    task = cohort([mlp(0), mlp(1, hidden=(8,)), mlp(2, hidden=(12,))], losses)
    b = batch()
    task.setup(b)
    loss, terms = task.module(b, 0.0)
    loss.backward()
    assert set(terms) == {"ce", "fitnet", "ce@peer1", "fitnet@peer1", "ce@peer2", "fitnet@peer2"}
    adapters = [link.objective for link in task.flow.links if "fitnet" in link.objective.terms]
    assert len(adapters) == 6 and len({id(o) for o in adapters}) == 6  # K (K - 1) pairs, each its own regressor
    assert all(p.grad is not None for p in task.module.parameters())


def test_ensemble_averages_probabilities_and_adds_no_trainable_parameter():
    task = cohort([mlp(0), mlp(1), mlp(2)])
    peers = peers_of(task)
    ens = task.eval_models()["ensemble"]
    assert isinstance(ens, ProbabilityEnsemble)
    x = batch().x
    expected = torch.stack([F.softmax(p(x), -1) for p in peers]).mean(0)
    assert torch.allclose(ens(x).exp(), expected, atol=1e-6)
    module_ids = [id(p) for p in task.module.parameters()]
    assert len(module_ids) == len(set(module_ids))
    assert {id(p) for p in ens.parameters()} == set(module_ids)  # a view of the peers, nothing new to train
    ens.eval()
    assert not any(p.training for p in peers)
    ens.train()


def test_mismatched_class_counts_fail_in_setup():
    torch.manual_seed(0)
    odd = create_model("mlp", num_classes=7, input_shape=(40,), hidden=(8,))
    with pytest.raises(ShapeError, match=r"peer1 \(MLP\): \(12, 7\)"):
        cohort([mlp(0), odd]).setup(batch())


def test_task_builds_the_cohort_from_the_recipe(ctx):
    task = Mutual.task(ctx, 1, Mutual.Params(n=3))
    assert task.flow.view_names == ["student", "peer1", "peer2"]
    baseline = ctx.student(1)
    student = task.flow.student
    assert all(torch.equal(u, v) for u, v in zip(student.state_dict().values(), baseline.state_dict().values()))
    assert task.export_model() is student and task.primary == "student"


def test_build_peers_seeds_and_specs(ctx):
    default = build_peers(ctx, 1, None, None)
    assert len(default) == 2
    baseline = ctx.student(1)
    assert all(torch.equal(u, v) for u, v in zip(default[0].state_dict().values(), baseline.state_dict().values()))
    assert not torch.equal(default[0].fc.weight, default[1].fc.weight)
    assert peer_seed(1, 0) == 1 and peer_seed(0, 1) not in (0, 1, 2)
    mixed = build_peers(
        ctx, 0, [{"name": "mlp", "params": {"hidden": [8]}}, {"name": "cnn1d", "params": {"channels": 4}}], None
    )
    assert [type(m).__name__ for m in mixed] == ["MLP", "CNN1d"]


def test_bad_cohorts_fail_with_clear_errors(ctx):
    with pytest.raises(ConfigError, match=r"scheme\.params\.n.*greater than or equal to 2"):
        check_config(load_config(deep_merge(TINY, {"scheme": {"name": "mutual", "params": {"n": 1}}})))
    with pytest.raises(ConfigError, match=r"at least 2 peer specs, got 1"):
        build_peers(ctx, 0, [{"name": "mlp"}], None)
    with pytest.raises(ConfigError, match=r"n=3 disagrees with the 2 specs"):
        build_peers(ctx, 0, [{"name": "mlp"}, {"name": "mlp"}], 3)
    with pytest.raises(ConfigError, match=r"peers\.1: expected a model spec"):
        build_peers(ctx, 0, [{"name": "mlp"}, "cnn1d"], None)
    with pytest.raises(ConfigError, match=r"peers\.1.*nmae"):
        build_peers(ctx, 0, [{"name": "mlp"}, {"nmae": "mlp"}], None)
    with pytest.raises(RegistryError, match=r"mpl"):
        build_peers(ctx, 0, [{"name": "mlp"}, {"name": "mpl"}], None)


@pytest.mark.parametrize(
    "key,where",
    [
        ("T", r"losses\.<term>\.T"),
        ("weight", r"losses\.<term>\.weight"),
        ("burn_in", r"losses\.<term>\.start_epoch"),
        ("rampup", r"losses\.<term>\.warmup_epochs"),
    ],
)
def test_loss_params_moved_to_the_losses_are_refused(key, where):
    cfg = load_config(deep_merge(TINY, {"scheme": {"name": "mutual", "params": {key: 2.0}}}))
    with pytest.raises(
        ConfigError, match=rf"scheme\.params\.{key}: not a parameter of scheme 'mutual' any more; .*{where}"
    ):
        check_config(cfg)


def test_an_objective_that_reads_no_peer_is_refused():
    with pytest.raises(ConfigError, match=r"scheme 'mutual': none of the losses \['ce'\] reads a teacher"):
        Mutual.task(fake_ctx({"ce": {}}, scheme="mutual"), 0, Mutual.Params())


# ---------------------------------------------------------------- end to end

SMALL = ["seeds=[0]", "train.epochs=2", "data.params.num_samples=600", "data.params.transfer_samples=300"]


@pytest.mark.slow
def test_recipe_runs_baseline_and_cohort_rows(tmp_path):
    ran = dk("run", "mutual", *SMALL, "scheme.params.transfer=true", "--out", "run", "--quiet", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    res = results(tmp_path / "run")
    assert {"baseline-s0", "mutual-s0", "mutual-s0:peer1", "mutual-s0:ensemble"} <= set(res)
    assert res["mutual-s0"]["scheme"] == "mutual" and res["mutual-s0"]["transfer"] is True
    assert res["mutual-s0"]["steps"] == res["mutual-s0:peer1"]["steps"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| mlp | peer1 | mutual |" in report and "ensemble" in report and "mutual: every peer" in report

    distilled = dk("distill", "mutual", *SMALL, "--out", "d", "--quiet", cwd=tmp_path)
    assert distilled.returncode == 0, distilled.stderr[-3000:]
    spec, _ = load_exported(tmp_path / "d" / "student.pt")
    assert spec["name"] == "mlp"
    assert evaluate_checkpoint(tmp_path / "d" / "student.pt")["top1"] == pytest.approx(
        results(tmp_path / "d")["mutual-s0"]["last_acc"], abs=0.01
    )


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    """gloo DDP over 2 CPU processes = one process with the same global batch (see test_ddp.py)."""
    recipe = write_recipe(
        tmp_path / "r.yaml",
        scheme={"name": "mutual", "params": {"n": 2}},
        teacher=None,
        losses={"ce": {}, "kd": {"T": 2.0, "alpha": 1.0}},
    )
    single = dk("distill", str(recipe), "--out", "single", "--quiet", cwd=tmp_path, env=ONE_THREAD)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = torchrun("distill", str(recipe), "--out", "ddp", "--quiet", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    assert ddp.stdout.count("run folder:") == 1  # only rank 0 reports (and writes)
    a, b = results(tmp_path / "single"), results(tmp_path / "ddp")
    for name in ("mutual-s0", "mutual-s0:peer1", "mutual-s0:ensemble"):
        assert a[name]["steps"] == b[name]["steps"]
    # weights compared below; accuracies not across runs: one test sample near a tie may flip
    # between float summation orders (0.5 points here), the likely cause of this test's one failure.
    # DDP's evaluation is checked on its own weights instead.
    assert evaluate_checkpoint(tmp_path / "ddp" / "student.pt")["top1"] == pytest.approx(
        b["mutual-s0"]["last_acc"], abs=0.01
    )
    _, wa = load_exported(tmp_path / "single" / "student.pt")
    _, wb = load_exported(tmp_path / "ddp" / "student.pt")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4), k
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ddp").rglob("*"))
