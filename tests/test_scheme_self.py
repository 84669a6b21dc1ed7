"""Teacher-free self-distillation schemes: CS-KD (class-wise partners) and Tf-KD_reg (virtual teacher)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from darkknowledge.commands import evaluate_checkpoint
from darkknowledge.config import deep_merge, load_config
from darkknowledge.data.batch import Batch
from darkknowledge.data.bundle import DatasetInfo
from darkknowledge.data.loader import BatchLoader
from darkknowledge.data.tensors import TensorData
from darkknowledge.engine.checkpoint import load_exported
from darkknowledge.errors import ConfigError
from darkknowledge.runs.build import check_config
from darkknowledge.runs.context import RunContext
from darkknowledge.schemes.cskd import CSKD
from darkknowledge.schemes.task import FlowTask
from darkknowledge.schemes.tfkd import TfKD
from darkknowledge.teachers.classwise import ClassPartners
from darkknowledge.teachers.peers import Peer
from darkknowledge.teachers.virtual import Virtual, virtual_teacher
from helpers import ONE_THREAD, TINY, dk, results, torchrun

CSKD_LOSSES = {"ce": {}, "cls": {"loss": "kd", "T": 4.0, "alpha": 1.0, "weight": 1.0}}
TFKD_LOSSES = {"ce": {"weight": 0.9}, "tf_reg": {"loss": "kd", "T": 1.0, "alpha": 1.0, "weight": 0.1}}


def tiny(scheme: Any, losses: dict[str, Any] | None = None, **changes: Any):
    """TINY without a teacher, with ``losses`` (default: ``ce`` and the scheme's teacher term)."""
    name = scheme if isinstance(scheme, str) else scheme["name"]
    base = {k: v for k, v in TINY.items() if k not in ("teacher", "losses")}
    raw = deep_merge(base, {"seeds": [0], "train": {"epochs": 1}, "scheme": scheme, **changes})
    default = CSKD_LOSSES if name == "cskd" else TFKD_LOSSES
    return load_config({**raw, "losses": losses if losses is not None else default})


def fake_ctx(scheme: Any, losses: dict[str, Any] | None = None, k: int = 4, d: int = 6) -> RunContext:
    """A context for ``k`` classes of ``d``-dim inputs without loading data (an MLP student)."""
    cfg = tiny(scheme, losses, student={"name": "mlp", "params": {"hidden": [8]}})
    session = SimpleNamespace(cfg=cfg, bundle=SimpleNamespace(info=DatasetInfo("toy", k, (d,))))
    return RunContext(session, cfg)  # type: ignore[arg-type]


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


def cskd_task(x: torch.Tensor, y: torch.Tensor, k: int, losses: dict[str, Any] | None = None) -> FlowTask:
    """CS-KD's plan for an MLP student, attached to the training data ``(x, y)``."""
    torch.manual_seed(0)
    task = CSKD.task(fake_ctx("cskd", losses, k=k, d=x.shape[1]), 0, CSKD.Params())
    task.attach(BatchLoader(TensorData(x, y), 8, shuffle=False))
    return task


def test_class_wise_term_matches_the_formula_and_is_detached():
    """A sample is taught by the network's own detached prediction on its partner; one without a
    partner is its own partner: it adds 0 to the term (which averages over the whole batch) and
    gets no class-wise gradient."""
    g = torch.Generator().manual_seed(1)
    x = 4 * torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 0, 1, -1, 2, 2])  # class 1 has one sample; sample 3 is unlabelled
    T = 2.0
    task = cskd_task(x, y, 3, {"cls": {"loss": "kd", "T": T, "alpha": 1.0}})
    student = task.flow.student
    assert [type(t) for t in task.teachers] == [Peer]
    b = Batch(x.clone().requires_grad_(), y, torch.arange(6))
    task.setup(b)
    views = task.flow.compute_views(b)
    assert not task.teachers[0](b, views).logits.requires_grad  # the partner half is a constant teacher
    loss, terms = task.module(b, 0.5)
    assert set(terms) == {"cls"}
    p, has = task.flow.partners.draw(b.idx, y, round(0.5 * 1_000_000))
    with torch.no_grad():
        q = F.softmax(student(x[p]) / T, -1)
    log_p = F.log_softmax(student(x) / T, -1)
    per = (q * (q.log() - log_p)).sum(-1)  # (B,)
    assert loss.item() == pytest.approx((T * T * per[has].sum() / 6).item(), rel=1e-4)  # float32 rounding
    loss.backward()
    assert b.x.grad[~has].abs().max() < 1e-6 and b.x.grad[has].abs().sum() > 0


def test_cskd_loss_and_gradient_equal_the_hand_computation():
    x, y = toy()
    task = cskd_task(x, y, 4, {"ce": {}, "cls": {"loss": "kd", "T": 4.0, "alpha": 1.0, "weight": 2.0}})
    student = task.flow.student
    idx = torch.tensor([0, 7, 13, 22, 39])
    batch = Batch(x[idx], y[idx], idx)
    task.setup(batch)
    loss, terms = task.module(batch, 0.25)
    assert set(terms) == {"ce", "cls"}
    student.zero_grad()
    loss.backward()
    got = [p.grad.clone() for p in student.parameters()]

    p, _ = ClassPartners(x, y, 4, seed=0).draw(idx, y[idx], round(0.25 * 1_000_000))  # the run seed's draw
    assert torch.equal(y[p], y[idx]) and (p != idx).all()
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
    assert task.describe()["losses"] == ["ce", "cls"] and task.describe()["adapter_params"] == 0
    assert task.export_model() is student and list(task.eval_models()) == ["student"]


def test_cskd_refuses_batches_not_from_the_training_split():
    x, y = toy()
    task = cskd_task(x, y, 4)
    bad = Batch(x[:4], torch.tensor([1, 1, 1, 1]), torch.arange(4))  # labels differ from the split's
    with pytest.raises(ConfigError, match="training"):
        task.setup(bad)


def test_cskd_needs_the_training_tensors():
    task = CSKD.task(fake_ctx("cskd"), 0, CSKD.Params())
    x, y = toy()
    with pytest.raises(RuntimeError, match="attach"):
        task.module(Batch(x[:4], y[:4], torch.arange(4)), 0.0)
    with pytest.raises(ConfigError, match="in-memory tensor dataset"):
        task.attach(SimpleNamespace(data=[(x[0], y[0])]))


def test_cskd_bad_params_and_losses_fail_clearly():
    with pytest.raises(
        ConfigError, match=r"scheme\.params\.T: not a parameter of scheme 'cskd' any more; .*losses\.<term>\.T"
    ):
        check_config(tiny({"name": "cskd", "params": {"T": 4.0}}))
    with pytest.raises(
        ConfigError,
        match=r"scheme\.params\.lambda_cls: not a parameter of scheme 'cskd' any more; "
        r".*losses\.cls: \{loss: kd, .*weight: lambda_cls\}",
    ):
        check_config(tiny({"name": "cskd", "params": {"lambda_cls": 3.0}}))
    with pytest.raises(
        ConfigError, match=r"scheme 'cskd': none of the losses \['ce'\] reads a teacher.*cls: \{loss: kd"
    ):
        CSKD.check(fake_ctx("cskd", {"ce": {}}), 0, CSKD.Params())


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
    """``(1 - alpha) CE + alpha * multiplier * KL(p^d_T || softmax(z))`` with alpha 0.3, multiplier 2:
    ``ce: {weight: 0.7}, tf_reg: {loss: kd, T: 1, alpha: 1, weight: 0.6}``; the unlabelled row adds 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g)
    y = torch.tensor([1, 4, -1, 0])
    losses = {"ce": {"weight": 0.7}, "tf_reg": {"loss": "kd", "T": 1.0, "alpha": 1.0, "weight": 0.6}}
    torch.manual_seed(0)
    task = TfKD.task(
        fake_ctx({"name": "tfkd", "params": {"a": 0.95, "T": 4.0}}, losses, k=5), 0, TfKD.Params(a=0.95, T=4.0)
    )
    student = task.flow.student
    (teacher,) = task.teachers
    assert isinstance(teacher, Virtual) and (teacher.a, teacher.T) == (0.95, 4.0)
    assert task.fingerprint() is None  # no network teaches: nothing to check on resume
    b = Batch(x.clone().requires_grad_(), y, torch.arange(4))
    task.setup(b)
    total, terms = task.module(b, 0.0)
    assert set(terms) == {"ce", "tf_reg"}

    z = student(x)
    keep = y >= 0
    q = virtual_teacher(y, 5, 0.95, 4.0)[keep]
    hand = (q * (q.log() - F.log_softmax(z[keep], -1))).sum(-1).sum() / 4  # student not softened
    assert terms["tf_reg"].item() == pytest.approx(hand.item(), rel=1e-5)
    ce = F.cross_entropy(z, y, ignore_index=-1)
    assert total.item() == pytest.approx((0.7 * ce + 0.6 * hand).item(), rel=1e-5)

    views = task.flow.compute_views(b)  # the virtual term alone: the unlabelled row is ignored
    task.flow.objective.terms["tf_reg"](views["student"], teacher(b, views), b).backward()
    assert b.x.grad[2].abs().max() < 1e-8 and b.x.grad[0].abs().min() > 1e-4  # its own prediction: 0 up to rounding


def test_tfkd_bad_params_fail_clearly():
    with pytest.raises(ConfigError, match=r"scheme\.params\.a.*less than 1"):
        check_config(tiny({"name": "tfkd", "params": {"a": 1.0}}))
    with pytest.raises(
        ConfigError,
        match=r"scheme\.params\.alpha: not a parameter of scheme 'tfkd' any more; "
        r".*ce: \{weight: 1 - alpha\}",
    ):
        check_config(tiny({"name": "tfkd", "params": {"alpha": 0.5}}))
    with pytest.raises(ConfigError, match=r"scheme\.params\.multiplier: not a parameter .*losses\.tf_reg\.weight"):
        check_config(tiny({"name": "tfkd", "params": {"multiplier": 2.0}}))
    with pytest.raises(ConfigError, match=r"scheme\.params\.temperature: unknown parameter"):
        check_config(tiny({"name": "tfkd", "params": {"temperature": 2}}))
    with pytest.raises(ConfigError, match=r"scheme 'tfkd': none of the losses \['ce'\] reads a teacher"):
        TfKD.check(fake_ctx("tfkd", {"ce": {}}), 0, TfKD.Params())
    fitnet = {"ce": {}, "fitnet": {"student_taps": ["fc:input"], "teacher_taps": ["fc:input"]}}
    with pytest.raises(ConfigError, match=r"virtual teacher.*has no features"):
        TfKD.check(fake_ctx("tfkd", fitnet), 0, TfKD.Params())


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["cskd", "tfkd"])
def test_recipe_runs_end_to_end(tmp_path, scheme):
    out = tmp_path / "run"
    proc = dk(
        "run", scheme, "seeds=[0]", "train.epochs=2", "data.params.num_samples=1000", "--out", str(out), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    entries = results(out)
    assert entries[f"{scheme}-s0"]["role"] == "student" and entries[f"{scheme}-s0"]["scheme"] == scheme
    assert "baseline-s0" in entries
    proc = dk(
        "distill", scheme, "train.epochs=1", "data.params.num_samples=1000", "--out", str(tmp_path / "d"), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d" / "student.pt").is_file()


@pytest.mark.slow
def test_cskd_two_process_ddp_draws_the_same_partners_as_one_process(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny("cskd", train={"epochs": 3}).model_dump(mode="json")))
    single = dk("distill", str(recipe), "--out", "single", "--quiet", cwd=tmp_path, env=ONE_THREAD)
    assert single.returncode == 0, single.stderr
    ddp = torchrun("distill", str(recipe), "--out", "ddp", "--quiet", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = results(tmp_path / "single")["cskd-s0"], results(tmp_path / "ddp")["cskd-s0"]
    assert a["steps"] == b["steps"]  # weights compared below; accuracies not across runs (near ties may flip)
    assert evaluate_checkpoint(tmp_path / "ddp" / "student.pt")["top1"] == pytest.approx(b["last_acc"], abs=0.01)
    _, wa = load_exported(tmp_path / "single" / "student.pt")
    _, wb = load_exported(tmp_path / "ddp" / "student.pt")
    for k in wa:  # same partners on both ranks as in one process: same weights up to float rounding
        assert torch.allclose(wa[k], wb[k], atol=1e-4), k
