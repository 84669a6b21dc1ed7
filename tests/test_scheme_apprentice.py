"""Apprentice scheme A: teacher and student trained jointly; the teacher learns from its own CE only."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from darkknowledge import commands
from darkknowledge.config import deep_merge, load_config
from darkknowledge.data import DatasetInfo
from darkknowledge.data.batch import Batch
from darkknowledge.engine.checkpoint import load_exported, state_hash
from darkknowledge.errors import ConfigError, RegistryError
from darkknowledge.runs.build import check_config
from darkknowledge.runs.context import RunContext
from darkknowledge.schemes import SCHEMES, resolve_scheme
from darkknowledge.schemes.apprentice import TEACHER_VIEW, Apprentice
from darkknowledge.schemes.cohort import peer_seed
from helpers import TINY, results

STUDENT = {"name": "mlp", "params": {"hidden": [8]}}
TEACHER = {"name": "mlp", "params": {"hidden": [32]}}
PAPER = {"ce": {"weight": 0.5}, "kd": {"T": 1.0, "alpha": 1.0, "weight": 0.5}}  # beta H(y,p_A) + gamma H(z_T,p_A)


def fake_ctx(
    losses: dict[str, Any] | None = None, teacher: dict[str, Any] | None = TEACHER, **changes: Any
) -> RunContext:
    """A context over a tiny recipe that builds models without loading data."""
    raw = deep_merge(TINY, {"student": STUDENT, "scheme": "apprentice", **changes})
    raw["losses"] = losses if losses is not None else PAPER
    if teacher is None:
        del raw["teacher"]
    else:
        raw["teacher"] = teacher
    cfg = load_config(raw)
    session = SimpleNamespace(cfg=cfg, bundle=SimpleNamespace(info=DatasetInfo("mnist1d", 10, (40,))))
    return RunContext(session, cfg)  # type: ignore[arg-type]


def params(**given: Any):
    return resolve_scheme("apprentice", given)[1]


def batch(n: int = 16) -> Batch:
    g = torch.Generator().manual_seed(3)
    return Batch(torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n))


def grads(loss: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        g if g is not None else torch.zeros_like(p)
        for g, p in zip(
            torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True),
            model.parameters(),
        )
    ]


def test_registered_with_its_paper():
    assert SCHEMES.get("apprentice") is Apprentice
    assert "Low-Precision" in Apprentice.citation and "ICLR 2018" in Apprentice.citation


def test_the_teacher_learns_from_its_own_cross_entropy_only():
    torch.manual_seed(0)
    task = Apprentice.task(fake_ctx(), 0, params())
    b = batch()
    task.setup(b)
    flow = task.flow
    student, teacher = flow.get_submodule("student"), flow.get_submodule(TEACHER_VIEW)
    loss, terms = flow(b, 0.0)
    assert set(terms) == {"ce", "kd", f"ce@{TEACHER_VIEW}"}

    z_s, z_t = student(b.x), teacher(b.x)  # (B, K) each
    p_t = F.softmax(z_t, -1)  # tau = 1
    soft_ce = -(p_t.detach() * F.log_softmax(z_s, -1)).sum(-1).mean()  # H(z_T, p_A), the teacher a constant
    entropy = -(p_t * F.log_softmax(z_t, -1)).sum(-1).mean().detach()
    paper = 1.0 * F.cross_entropy(z_t, b.y) + 0.5 * F.cross_entropy(z_s, b.y) + 0.5 * soft_ce
    # kd at T=1 is KL(p_T || p_A) = H(p_T, p_A) - H(p_T): the same loss up to a constant
    assert torch.allclose(loss, paper - 0.5 * entropy, atol=1e-6)

    for ours, hand in zip(grads(loss, teacher), grads(F.cross_entropy(z_t, b.y), teacher)):
        assert torch.allclose(ours, hand, atol=1e-6)  # alpha H(y, p_T) alone reaches the teacher
    for ours, hand in zip(grads(loss, student), grads(paper, student)):
        assert torch.allclose(ours, hand, atol=1e-6)
    # the control: had the third term reached the teacher, its gradient would differ
    undetached = -(p_t * F.log_softmax(z_s, -1)).sum(-1).mean()
    leaky = grads(F.cross_entropy(z_t, b.y) + 0.5 * undetached, teacher)
    assert not all(torch.allclose(a, c, atol=1e-6) for a, c in zip(grads(loss, teacher), leaky))


def test_teacher_losses_set_what_the_teacher_learns():
    task = Apprentice.task(fake_ctx(), 0, params(teacher_losses={"ce": {"weight": 2.0, "label_smoothing": 0.1}}))
    b = batch()
    task.setup(b)
    teacher = task.flow.get_submodule(TEACHER_VIEW)
    loss, terms = task.flow(b, 0.0)
    z_t = teacher(b.x)
    expected = grads(2.0 * F.cross_entropy(z_t, b.y, label_smoothing=0.1), teacher)
    assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(grads(loss, teacher), expected))
    assert torch.allclose(terms[f"ce@{TEACHER_VIEW}"], F.cross_entropy(z_t, b.y, label_smoothing=0.1), atol=1e-6)


def test_views_start_from_the_baseline_and_peer_seeds_and_the_student_is_exported():
    ctx = fake_ctx()
    task = Apprentice.task(ctx, 2, params())
    assert state_hash(task.flow.get_submodule("student")) == state_hash(ctx.student(2))
    fresh = ctx.model(TEACHER, seed=peer_seed(2, 1), where="teacher")
    assert state_hash(task.flow.get_submodule(TEACHER_VIEW)) == state_hash(fresh)
    assert list(task.eval_models()) == ["student", TEACHER_VIEW]
    assert task.export_model() is task.flow.get_submodule("student")
    assert task.fingerprint() is None  # no frozen teacher: nothing pre-trained to check on resume


@pytest.mark.parametrize(
    "change,match",
    [
        ({"teacher": None}, r"scheme 'apprentice' needs a `teacher:` section naming the full-precision teacher"),
        (
            {"teacher": {**TEACHER, "checkpoint": "t.pt"}},
            r"teacher\.checkpoint is 't\.pt'; remove it, or use scheme 'offline' for scheme B",
        ),
        ({"losses": {"ce": {}}}, r"scheme 'apprentice': none of the losses \['ce'\] reads a teacher"),
    ],
)
def test_recipes_it_cannot_train_are_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        Apprentice.task(fake_ctx(**change), 0, params())


@pytest.mark.parametrize(
    "teacher_losses,match",
    [
        ({"kd": {"T": 1.0}}, r"scheme\.params\.teacher_losses: \['kd'\] read a teacher, but in Apprentice's scheme A"),
        ({}, r"scheme\.params\.teacher_losses: the teacher needs a loss of its own"),
        ({"cee": {}}, r"unknown loss 'cee'\. Did you mean 'ce'\?"),
    ],
)
def test_bad_teacher_losses_are_one_clear_error(teacher_losses, match):
    with pytest.raises((ConfigError, RegistryError), match=match):
        Apprentice.task(fake_ctx(), 0, params(teacher_losses=teacher_losses))


def test_a_temperature_in_scheme_params_points_to_the_losses():
    cfg = load_config(deep_merge(TINY, {"scheme": {"name": "apprentice", "params": {"T": 1.0}}}))
    with pytest.raises(ConfigError, match=r"scheme\.params\.T: not a parameter of scheme 'apprentice' any more"):
        check_config(cfg)


def test_a_run_trains_both_and_reports_the_teacher_row(tmp_path):
    raw = deep_merge(
        TINY,
        {
            "seeds": [0],
            "student": STUDENT,
            "losses": PAPER,
            "train": {"epochs": 1},
            "data": {"params": {"num_samples": 300}, "batch_size": 60},
            "scheme": "apprentice",
        },
    )
    raw["teacher"] = TEACHER
    out = commands.distill(load_config(raw), out=tmp_path / "run", progress=False)
    rows = results(tmp_path / "run")
    assert out["student"]["name"] == "apprentice-s0" and out["student"]["role"] == "student"
    peer = rows[f"apprentice-s0:{TEACHER_VIEW}"]
    assert peer["role"] == TEACHER_VIEW and peer["member_of"] == "apprentice-s0" and peer["model"] == "mlp"
    assert not any(e["role"] == "teacher" for e in rows.values())  # no pre-trained teacher was trained
    _, exported = load_exported(tmp_path / "run" / "student.pt")
    assert state_hash(exported) == state_hash(out["model"])
    assert sorted(out["student"]["losses"]) == ["ce", f"ce@{TEACHER_VIEW}", "kd"]
