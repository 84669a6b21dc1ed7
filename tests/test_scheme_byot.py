"""BYOT: heads at the stages, only the deepest classifier teaches, heads removed at export.

DDP tolerance: per-step gradients of two half-batches average to the one-process gradient to
float precision (tested in process). The 2-process test trains with SGD: Adam turns rounding
noise in near-zero gradients into lr-sized steps (measured: 1e-2 in head weights after 2 epochs),
while with SGD network and heads agree to 1e-6 (measured 7e-7); it checks 1e-5.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from darkknowledge.build import check_config
from darkknowledge.commands import compare
from darkknowledge.config import deep_merge, load_config
from darkknowledge.data.batch import Batch
from darkknowledge.engine.checkpoint import load_exported, safe_load
from darkknowledge.errors import ConfigError, TapError
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.models import count_params, create_model
from darkknowledge.schemes import SCHEMES
from darkknowledge.schemes.byot import BYOT, byot_loss
from helpers import TINY, dk, results

BYOT_TINY = {
    "seeds": [0],
    "teacher": None,
    "student": {"name": "cnn1d", "params": {"channels": 8}},
    "losses": {"ce": {}},
    "scheme": {"name": "byot", "params": {}},
    "train": {"epochs": 1},
}


def _cfg(**params):
    raw = deep_merge(TINY, {**BYOT_TINY, "scheme": {"name": "byot", "params": params}})
    raw["student"] = BYOT_TINY["student"]  # replace the TINY mlp (its params do not fit a cnn1d)
    return load_config(raw)


def _batch(n: int = 6, k: int = 10, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 40, generator=g), torch.randint(0, k, (n,), generator=g), torch.arange(n))


def _scheme(stages=None, **kw) -> BYOT:
    torch.manual_seed(0)
    scheme = BYOT(create_model("cnn1d", num_classes=10, input_shape=(40,), channels=8), stages, **kw)
    scheme.setup(_batch())
    return scheme


def test_registered_with_citation():
    assert SCHEMES.get("byot") is BYOT
    assert "Be Your Own Teacher" in BYOT.citation and "ICCV 2019" in BYOT.citation


def test_heads_at_default_and_given_stages_with_the_penultimate_shape():
    scheme = _scheme()
    assert scheme.module.stages == ["blocks.0", "blocks.1"]  # every stage but the deepest (blocks.2)
    x = _batch().x
    feats = {}
    hooks = [scheme.net.get_submodule(s).register_forward_hook(lambda m, i, o, s=s: feats.__setitem__(s, o))
             for s in ("blocks.0", "blocks.1")]
    scheme.net(x)
    for h in hooks:
        h.remove()
    assert feats["blocks.0"].shape == (6, 8, 40) and feats["blocks.1"].shape == (6, 8, 20)
    for stage, head in zip(scheme.module.stages, scheme.heads()):
        f, z = head(feats[stage])
        assert f.shape == (6, scheme.net.fc.in_features) == (6, 8 * 10) and z.shape == (6, 10)

    one = _scheme(["blocks.1"], bottleneck="mlp", width=12)
    assert one.module.stages == ["blocks.1"] and len(one.heads()) == 1
    assert one.heads()[0].bottleneck[1].out_features == 12
    assert one.describe()["adapter_params"] == count_params(one.module.heads) > 0


def test_mlp_student_gets_linear_bottlenecks():
    torch.manual_seed(0)
    scheme = BYOT(create_model("mlp", num_classes=10, input_shape=(40,), hidden=[16, 24, 32]))
    scheme.setup(_batch())
    assert scheme.module.stages == ["blocks.0", "blocks.1"]
    loss, terms = scheme.module(_batch())
    assert set(terms) == {"ce", "ce_heads", "kl", "feat"} and torch.isfinite(loss)


def test_loss_matches_the_paper_formula():
    g = torch.Generator().manual_seed(1)
    zc, fc = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    zs = [torch.randn(5, 4, generator=g) for _ in range(2)]
    fs = [torch.randn(5, 3, generator=g) for _ in range(2)]
    y = torch.tensor([0, 1, 2, 3, -1])  # the unlabelled sample only counts in KL and feature terms
    a, lam, T = 0.3, 0.03, 3.0
    total, terms = byot_loss(zc, fc, zs, fs, y, a, lam, T)
    ce = lambda z: F.cross_entropy(z[:4], y[:4])
    expected = (1 - a) * ce(zc) + sum(
        (1 - a) * ce(z) + a * T**2 * F.kl_div(F.log_softmax(z / T, -1), F.softmax(zc / T, -1), reduction="batchmean")
        + lam * ((f - fc) ** 2).mean() for z, f in zip(zs, fs))
    assert torch.allclose(total, expected, atol=1e-5)
    assert torch.allclose(terms["kl"], sum(kd_soft_loss(z, zc, T) for z in zs))


def test_only_the_deepest_classifier_teaches():
    scheme = _scheme()
    m, batch = scheme.module, _batch()
    logits, deep, head_logits, head_feats = m.outputs(batch.x)
    # the distillation terms alone (KL + feature), recomputed with gradients
    distill = sum(kd_soft_loss(z, logits.detach(), 3.0) + F.mse_loss(f, deep.detach())
                  for z, f in zip(head_logits, head_feats))
    m.zero_grad()
    distill.backward(retain_graph=True)
    for name in ("fc.weight", "fc.bias", "blocks.2.0.weight"):  # the deepest classifier and stage learn nothing
        grad = dict(m.net.named_parameters())[name].grad
        assert grad is None or grad.abs().max() == 0, name
    assert m.net.blocks[0][0].weight.grad.abs().sum() > 0  # shallow stages learn from their heads
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for h in m.heads for p in h.parameters())

    # and the full loss: the deep logits get exactly the gradient of (1 - a) * CE(q_C, y)
    deep_logits = logits.detach().requires_grad_()
    total, _ = byot_loss(deep_logits, deep.detach().requires_grad_(), [z.detach() for z in head_logits],
                         [f.detach() for f in head_feats], batch.y, 0.3, 0.03, 3.0)
    (g,) = torch.autograd.grad(total, deep_logits)
    ref = logits.detach().requires_grad_()
    (g_ref,) = torch.autograd.grad(0.7 * F.cross_entropy(ref, batch.y), ref)
    assert torch.allclose(g, g_ref, atol=1e-6)


def test_full_batch_gradient_is_the_mean_of_half_batch_gradients():
    """What DDP relies on: no batch statistics (no BatchNorm in the heads), so two ranks holding
    half a batch each average to the one-process gradient."""
    scheme = _scheme()
    m, batch = scheme.module, _batch(n=8)

    def grads(sl: slice) -> list[torch.Tensor]:
        m.zero_grad()
        loss, _ = m(Batch(batch.x[sl], batch.y[sl], batch.idx[sl]))
        loss.backward()
        return [p.grad.clone() for p in m.parameters()]

    full, a, b = grads(slice(0, 8)), grads(slice(0, 4)), grads(slice(4, 8))
    for g, ga, gb in zip(full, a, b):
        assert torch.allclose(g, (ga + gb) / 2, atol=1e-6)


def test_taps_record_only_in_the_training_forward():
    scheme = _scheme()
    scheme.net(_batch().x)  # the network alone: nothing is recorded
    assert scheme.module.taps.features == {}


def test_export_is_the_bare_network_and_reloads_into_the_zoo_model(tmp_path):
    from darkknowledge.build import model_spec
    from darkknowledge.engine.checkpoint import export_model

    scheme = _scheme()
    net = scheme.export_model()
    bare = create_model("cnn1d", num_classes=10, input_shape=(40,), channels=8)
    assert set(net.state_dict()) == set(bare.state_dict())
    assert count_params(net) == count_params(bare)
    export_model(net, tmp_path / "m.pt", model_spec(net))
    spec, state = load_exported(tmp_path / "m.pt")
    rebuilt = create_model(spec["name"], **spec["params"])
    rebuilt.load_state_dict(state)
    x = _batch().x
    assert torch.equal(rebuilt(x), net(x))


def test_eval_views_are_outside_the_module():
    scheme = _scheme()
    models = scheme.eval_models()
    assert list(models) == ["student", "head1", "head2"]
    assert models["student"] is scheme.net
    n_module = len(list(scheme.module.parameters()))
    assert n_module == len({id(p) for p in scheme.module.parameters()})  # no parameter registered twice
    x = _batch().x
    z = models["head1"](x)
    m = scheme.module
    _, _, head_logits, _ = m.outputs(x)
    assert torch.allclose(z, head_logits[0])
    assert scheme.eval_models()["head1"] is models["head1"]  # views are reused, not rebuilt


def test_bad_stage_paths_and_params_give_clear_errors():
    net = create_model("cnn1d", num_classes=10, input_shape=(40,), channels=8)
    with pytest.raises(TapError, match=r"'blocks\.7'.*Closest valid paths: .*'blocks\.0'"):
        BYOT(net, ["blocks.7"])
    with pytest.raises(ConfigError, match="stages is empty"):
        BYOT(net, [])
    with pytest.raises(ConfigError, match="twice"):
        BYOT(net, ["blocks.0", "blocks.0"])
    cfg = _cfg(alpha=1.5)
    with pytest.raises(ConfigError, match=r"scheme\.params\.alpha"):
        check_config(cfg)
    cfg = _cfg(bottleneck="x")
    with pytest.raises(ConfigError, match=r"scheme\.params\.bottleneck.*conv.*mlp"):
        check_config(cfg)


def test_run_reports_a_row_per_head(tmp_path):
    cfg = _cfg()
    res = compare(cfg, out=tmp_path / "run", progress=False)
    assert [r["role"] for r in res["rows"]] == ["baseline", "student", "head1", "head2"]
    entries = results(tmp_path / "run")
    assert entries["byot-s0"]["extra_params"] > 0 and entries["byot-s0"]["model"] == "cnn1d"
    assert entries["byot-s0:head1"]["member_of"] == "byot-s0"
    assert entries["byot-s0:head2"]["model"] == "cnn1d@blocks.1"
    _, state = load_exported(tmp_path / "run" / "byot-s0" / "model.pt")
    assert not any("head" in k for k in state)
    report = res["report"].read_text()
    assert "| head1 | byot |" in report and "early exits" in report


@pytest.mark.slow
def test_recipe_runs_end_to_end(tmp_path):
    run = dk("run", "byot", "data.params.num_samples=1000", "train.epochs=2", "seeds=[0]",
             "--out", "r", "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    entries = results(tmp_path / "r")
    assert {"baseline-s0", "byot-s0", "byot-s0:head1", "byot-s0:head2"} <= set(entries)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    args = ["distill", "byot", "data.params.num_samples=1000", "train.epochs=2", "data.batch_size=50",
            "train.optimizer.name=sgd", "train.optimizer.lr=0.05", "train.deterministic=true", "train.device=cpu",
            "--quiet"]
    single = dk(*args, "--out", "single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "darkknowledge.cli", *args, "--out", "ddp"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("run folder:") == 1  # only rank 0 reports (and writes)
    a, b = results(tmp_path / "single"), results(tmp_path / "ddp")
    assert a["byot-s0"]["steps"] == b["byot-s0"]["steps"]
    for name in ("byot-s0", "byot-s0:head1", "byot-s0:head2"):
        assert abs(a[name]["last_acc"] - b[name]["last_acc"]) <= 0.5, name
    _, wa = load_exported(tmp_path / "single" / "student.pt")
    _, wb = load_exported(tmp_path / "ddp" / "student.pt")
    assert set(wa) == set(wb) and not any("head" in k for k in wa)
    ma = safe_load(tmp_path / "single" / "byot-s0" / "last.pt")["module"]  # network and heads
    mb = safe_load(tmp_path / "ddp" / "byot-s0" / "last.pt")["module"]
    assert any(k.startswith("heads.") for k in ma)
    for k in ma:
        assert torch.allclose(ma[k], mb[k], atol=1e-5), k
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ddp").rglob("*"))
