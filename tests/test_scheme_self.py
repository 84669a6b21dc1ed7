"""Teacher-free self-distillation schemes: CS-KD (class-wise partners) and Tf-KD_reg (virtual teacher)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch
import yaml
import torch.nn.functional as F
from torch import nn

from darkknowledge.build import build_objective, check_config
from darkknowledge.commands import compare
from darkknowledge.config import deep_merge, load_config
from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError
from darkknowledge.schemes.cskd import CSKD, ClassPartners, class_wise_kd_loss
from darkknowledge.schemes.tfkd import TfKD, tf_reg_loss, tfkd_objective, virtual_teacher
from darkknowledge.engine.checkpoint import load_exported
from helpers import TINY, dk, results


def tiny(scheme: Any, losses: dict[str, Any] | None = None, **changes: Any):
    """TINY without a teacher, with a teacher-free objective (``ce`` unless ``losses``)."""
    base = {k: v for k, v in TINY.items() if k not in ("teacher", "losses")}
    raw = deep_merge(base, {"seeds": [0], "train": {"epochs": 1}, "scheme": scheme, **changes})
    return load_config({**raw, "losses": losses if losses is not None else {"ce": {}}})


def toy(n: int = 40, k: int = 4, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.arange(n) % k  # (N, D), (N,) k classes of n/k each


# ---------------------------------------------------------------- CS-KD


def test_partners_share_the_class_and_are_other_samples():
    x, y = toy()
    partners = ClassPartners(x, y, 4, seed=0)
    idx = torch.arange(40)
    for key in range(5):
        p, has = partners.draw(idx, y, key)
        assert has.all()
        assert torch.equal(y[p], y)  # same class
        assert (p != idx).all()  # never the sample itself
    assert torch.equal(partners.fetch(p, x), x[p])


def test_pairing_is_deterministic_and_independent_of_the_batch():
    x, y = toy()
    partners = ClassPartners(x, y, 4, seed=3)
    full, _ = partners.draw(torch.arange(40), y, 17)
    again, _ = partners.draw(torch.arange(40), y, 17)
    assert torch.equal(full, again)  # same seed and step: same partners (resume)
    part = torch.tensor([5, 30, 11])  # another rank's / batch's share: the same partner per sample
    p, _ = partners.draw(part, y[part], 17)
    assert torch.equal(p, full[part])
    other, _ = partners.draw(torch.arange(40), y, 18)
    assert not torch.equal(full, other)  # a new draw each step
    other_seed, _ = ClassPartners(x, y, 4, seed=4).draw(torch.arange(40), y, 17)
    assert not torch.equal(full, other_seed)
    seen = torch.stack([partners.draw(torch.arange(40), y, s)[0] for s in range(200)])  # (200, N)
    assert all(len(set(seen[:, i].tolist())) == 9 for i in range(40))  # every other class member gets drawn


def test_unlabelled_and_lonely_samples_get_no_partner():
    x = torch.randn(6, 3)
    y = torch.tensor([0, 0, 1, -1, 2, 2])  # class 1 has one sample; sample 3 is unlabelled
    partners = ClassPartners(x, y, 3, seed=0)
    p, has = partners.draw(torch.arange(6), y, 0)
    assert has.tolist() == [True, True, False, False, True, True]
    assert p.tolist() == [1, 0, 2, 3, 5, 4]


def test_class_wise_term_matches_the_formula_and_is_detached():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 4, generator=g, requires_grad=True)
    zp = torch.randn(5, 4, generator=g, requires_grad=True)
    has = torch.tensor([True, True, False, True, True])
    T = 3.0
    loss = class_wise_kd_loss(z, zp, has, T)
    q, log_p = F.softmax(zp / T, -1), F.log_softmax(z / T, -1)
    per = (q * (q.log() - log_p)).sum(-1)  # (B,)
    assert loss.item() == pytest.approx((T * T * per[has].mean()).item(), rel=1e-5)
    loss.backward()
    assert zp.grad is None or not zp.grad.any()  # the partner is the (constant) teacher
    assert not z.grad[2].any() and z.grad[0].any()  # a sample without partner gets no class-wise gradient


def _cskd_scheme(x, y, student, T=4.0, lam=2.0):
    partners = ClassPartners(x, y, 4, seed=0)
    return CSKD(student, build_objective({"ce": {}}), partners, T, lam), partners


def test_cskd_loss_and_gradient_equal_the_hand_computation():
    x, y = toy()
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    scheme, partners = _cskd_scheme(x, y, student)
    idx = torch.tensor([0, 7, 13, 22, 39])
    batch = Batch(x[idx], y[idx], idx)
    scheme.setup(batch)
    loss, terms = scheme.module(batch, None, 0.25)
    assert set(terms) == {"ce", "cls"}
    student.zero_grad()
    loss.backward()
    got = [p.grad.clone() for p in student.parameters()]

    p, _ = partners.draw(idx, y[idx], round(0.25 * 1_000_000))
    assert torch.equal(y[p], y[idx])
    student.zero_grad()
    z = student(x[idx])
    with torch.no_grad():  # the official code: the partner forward is a constant
        zp = student(x[p])
    kl = F.kl_div(F.log_softmax(z / 4.0, -1), F.softmax(zp / 4.0, -1), reduction="batchmean")
    expected = F.cross_entropy(z, y[idx]) + 2.0 * 16.0 * kl
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()
    for a, b in zip(got, (q.grad for q in student.parameters())):
        assert torch.allclose(a, b, atol=1e-6)
    assert scheme.describe()["losses"] == ["ce", "cls"] and scheme.describe()["adapter_params"] == 0


def test_cskd_refuses_batches_not_from_the_training_split():
    x, y = toy()
    scheme, _ = _cskd_scheme(x, y, nn.Linear(6, 4))
    bad = Batch(x[:4], torch.tensor([1, 1, 1, 1]), torch.arange(4))  # labels differ from the split's
    with pytest.raises(ConfigError, match="transfer set"):
        scheme.setup(bad)


def test_cskd_bad_params_and_teacher_losses_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match=r"scheme\.params\.T.*greater than 0"):
        check_config(tiny({"name": "cskd", "params": {"T": 0}}))
    with pytest.raises(ConfigError, match=r"scheme\.params\.lambda_cls.*greater than or equal to 0"):
        check_config(tiny({"name": "cskd", "params": {"lambda_cls": -1}}))
    with pytest.raises(ConfigError, match=r"losses\.kd.*needs one.*ce"):
        compare(tiny("cskd", losses={"kd": {}}), out=tmp_path / "r", progress=False)


# ---------------------------------------------------------------- Tf-KD_reg


def test_virtual_teacher_matches_the_official_formula():
    y = torch.tensor([2, 0, -1])
    q = virtual_teacher(y, 4, a=0.9, T=2.0)
    assert torch.allclose(q.sum(-1), torch.ones(3))
    p_d = torch.full((4,), 0.1 / 3)
    p_d[2] = 0.9
    assert torch.allclose(q[0], F.softmax(p_d / 2.0, -1))
    assert torch.allclose(q[2], torch.full((4,), 0.25))  # unlabelled: uniform (and ignored by the loss)
    assert q[1].argmax() == 0
    sharp = virtual_teacher(torch.tensor([1]), 3, a=0.99, T=0.01)  # a cold softmax: one-hot on the class
    assert sharp[0, 1] > 0.999
    q20 = virtual_teacher(torch.tensor([0]), 10, a=0.99, T=20.0)  # the official CIFAR setting is near uniform
    assert q20[0, 0].item() == pytest.approx(0.1045, abs=1e-3)


def test_tfkd_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, generator=g, requires_grad=True)
    y = torch.tensor([1, 4, -1, 0])
    loss = tf_reg_loss(z, y, a=0.95, T=4.0)
    keep = y >= 0
    q = virtual_teacher(y, 5, 0.95, 4.0)[keep]
    hand = (q * (q.log() - F.log_softmax(z[keep], -1))).sum(-1).mean()  # student not softened
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    loss.backward()
    assert not z.grad[2].any()  # the unlabelled row is ignored

    objective = tfkd_objective(build_objective({"ce": {}}), a=0.95, T=4.0, alpha=0.3, multiplier=2.0)
    scheme = TfKD(nn.Identity(), objective)
    batch = Batch(z.detach(), y, torch.arange(4))
    total, terms = scheme.module(batch, None, 0.0)
    ce = F.cross_entropy(z.detach(), y, ignore_index=-1)
    assert total.item() == pytest.approx((0.7 * ce + 0.3 * 2.0 * hand).item(), rel=1e-5)
    assert set(terms) == {"ce", "tf_reg"}
    assert scheme.teacher is None and scheme.teacher_hash() is None


def test_tfkd_bad_params_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match=r"scheme\.params\.a.*less than 1"):
        check_config(tiny({"name": "tfkd", "params": {"a": 1.0}}))
    with pytest.raises(ConfigError, match=r"scheme\.params\.alpha.*less than or equal to 1"):
        check_config(tiny({"name": "tfkd", "params": {"alpha": 1.5}}))
    with pytest.raises(ConfigError, match=r"scheme\.params\.temperature: unknown parameter"):
        check_config(tiny({"name": "tfkd", "params": {"temperature": 2}}))
    with pytest.raises(ConfigError, match=r"losses\.kd.*needs one"):
        compare(tiny("tfkd", losses={"kd": {}}), out=tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match=r"losses\.tf_reg.*reserved"):
        tfkd_objective(build_objective({"tf_reg": {"loss": "ce"}}), 0.9, 1.0, 0.5, 1.0)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["cskd", "tfkd"])
def test_recipe_runs_end_to_end(tmp_path, scheme):
    out = tmp_path / "run"
    proc = dk("run", scheme, "seeds=[0]", "train.epochs=2", "data.params.num_samples=1000", "--out", str(out),
              cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    entries = results(out)
    assert entries[f"{scheme}-s0"]["role"] == "student" and entries[f"{scheme}-s0"]["scheme"] == scheme
    assert "baseline-s0" in entries
    proc = dk("distill", scheme, "train.epochs=1", "data.params.num_samples=1000", "--out", str(tmp_path / "d"),
              cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d" / "student.pt").is_file()


def _torchrun(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "darkknowledge.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cskd_two_process_ddp_draws_the_same_partners_as_one_process(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny("cskd", train={"epochs": 3}).model_dump(mode="json")))
    single = dk("distill", str(recipe), "--out", "single", "--quiet", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = _torchrun("distill", str(recipe), "--out", "ddp", "--quiet", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = results(tmp_path / "single")["cskd-s0"], results(tmp_path / "ddp")["cskd-s0"]
    assert a["steps"] == b["steps"] and abs(a["last_acc"] - b["last_acc"]) <= 0.5
    _, wa = load_exported(tmp_path / "single" / "student.pt")
    _, wb = load_exported(tmp_path / "ddp" / "student.pt")
    for k in wa:  # same partners on both ranks as in one process: same weights up to float rounding
        assert torch.allclose(wa[k], wb[k], atol=1e-4), k
