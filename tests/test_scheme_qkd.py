"""QKD: self-studying, co-studying, tutoring, in order, each a resumable stage with the right trainable parts."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from darkknowledge import commands
from darkknowledge.config import deep_merge, load_config
from darkknowledge.data import DatasetInfo
from darkknowledge.data.batch import Batch
from darkknowledge.engine.checkpoint import load_exported, safe_load, state_hash
from darkknowledge.engine.task import MAIN
from darkknowledge.errors import ConfigError
from darkknowledge.losses.ce import cross_entropy
from darkknowledge.losses.kd import kd_soft_loss
from darkknowledge.models import create_model
from darkknowledge.runs.context import RunContext
from darkknowledge.schemes import SCHEMES, resolve_scheme
from darkknowledge.schemes.qkd import (
    QKD,
    TEACHER,
    CoStudyTask,
    co_study_task,
    phase_epochs,
)
from darkknowledge.schemes.task import FlowTask
from darkknowledge.teachers.frozen import Frozen
from helpers import TINY, results

STUDENT = {"name": "mlp", "params": {"hidden": [8]}}
TEACHER_SPEC = {"name": "mlp", "params": {"hidden": [32]}}
LOSSES = {"ce": {}, "kd": {"T": 2.0, "alpha": 1.0}}  # L_S = CE + tau^2 KL, tau = 2


def params(**given: Any):
    return resolve_scheme("qkd", given)[1]


def batch(n: int = 16) -> Batch:
    g = torch.Generator().manual_seed(5)
    return Batch(torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n))


class StubContext(RunContext):
    """A run context without data: ``train`` records each stage's task and nudges what it trains."""

    def __init__(self, losses: dict[str, Any] | None = None, teacher: bool = True, epochs: int = 10) -> None:
        raw = deep_merge(TINY, {"student": STUDENT, "scheme": "qkd", "train": {"epochs": epochs}})
        raw["losses"] = losses if losses is not None else LOSSES
        if teacher:
            raw["teacher"] = TEACHER_SPEC
        else:
            del raw["teacher"]
        cfg = load_config(raw)
        session = SimpleNamespace(
            cfg=cfg,
            bundle=SimpleNamespace(info=DatasetInfo("mnist1d", 10, (40,))),
            run=SimpleNamespace(stage_dir=lambda stage: None),
        )  # an in-memory run
        super().__init__(session, cfg)  # type: ignore[arg-type]
        torch.manual_seed(9)
        self.pretrained = create_model("mlp", num_classes=10, input_shape=(40,), hidden=[32])
        self.pretrained_hash = state_hash(self.pretrained)
        self.stages: list[dict[str, Any]] = []

    def teacher(self):
        return self.pretrained

    def train(self, stage, task, seed, role="student", train_cfg=None, with_transfer=False, label=None):
        parts = task.parts()
        record = {
            "stage": stage,
            "role": role,
            "epochs": train_cfg.epochs,
            "task": task,
            "label": label,
            "parts": [(p.name, {id(q) for q in p.parameters()}, p.optimizer) for p in parts],
            "teachers": list(task.teachers),
            "fingerprint": task.fingerprint(),
            "models": dict(task.eval_models()),
            "student_start": state_hash(task.eval_models()["student"]),
        }
        if isinstance(task, CoStudyTask):
            record["teacher_start"] = state_hash(task.flow.get_submodule(TEACHER))
            record["teacher_trainable"] = all(p.requires_grad for p in task.flow.get_submodule(TEACHER).parameters())
        self.stages.append(record)
        with torch.no_grad():  # "training": every trainable parameter of every part moves
            for p in {id(q): q for part in parts for q in part.parameters()}.values():
                p.add_(0.01)
        self.exports[stage] = task.export_model()
        return [{"name": stage, "role": role}] + [
            {"name": f"{stage}:{n}", "role": n} for n in task.eval_models() if n != "student"
        ]

    def train_alone(self, stage, model, seed, role="stage", train_cfg=None):
        self.stages.append(
            {
                "stage": stage,
                "role": role,
                "epochs": train_cfg.epochs,
                "model": model,
                "student_start": state_hash(model),
            }
        )
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        self.stages[-1]["student_end"] = state_hash(model)
        self.exports[stage] = model
        return {"name": stage, "role": role}


def test_registered_with_its_paper():
    assert SCHEMES.get("qkd") is QKD and "Quantization-aware Knowledge Distillation" in QKD.citation


# ---------------------------------------------------------------- phase bookkeeping


@pytest.mark.parametrize(
    "total,expected", [(10, (3, 3, 4)), (4, (1, 1, 2)), (3, (1, 1, 1)), (7, (2, 2, 3)), (100, (30, 30, 40))]
)
def test_default_phases_split_train_epochs_30_30_40(total, expected):
    assert phase_epochs(total, (None, None, None)) == expected


def test_default_phases_always_add_up_with_a_tutoring_epoch():
    for total in range(3, 80):
        ss, cs, tu = phase_epochs(total, (None, None, None))
        assert ss + cs + tu == total and min(ss, cs, tu) >= 1


def test_given_phases_are_used_as_they_are_and_may_skip_a_phase():
    assert phase_epochs(6, (0, 2, 4)) == (0, 2, 4)
    assert phase_epochs(6, (2, 0, 4)) == (2, 0, 4)


@pytest.mark.parametrize(
    "total,given,match",
    [
        (
            5,
            (1, 1, 2),
            r"self_study_epochs \+ co_study_epochs \+ tutor_epochs = 1 \+ 1 \+ 2 = 4, but train\.epochs is 5",
        ),
        (5, (1, None, None), r"co_study_epochs, tutor_epochs not set while self_study_epochs is; give all three"),
        (2, (None, None, None), r"train\.epochs=2 is too few for QKD's three phases"),
    ],
)
def test_bad_phase_epochs_are_one_clear_error(total, given, match):
    with pytest.raises(ConfigError, match=match):
        phase_epochs(total, given)


@pytest.mark.parametrize(
    "given,match",
    [
        ({"tutor_epochs": 0}, r"scheme\.params\.tutor_epochs"),
        ({"co_study_epochs": -1}, r"scheme\.params\.co_study_epochs"),
        ({"teacher_lr": 0.0}, r"scheme\.params\.teacher_lr"),
        ({"tutoring_epochs": 3}, r"unknown parameter 'tutoring_epochs'.*Did you mean 'tutor_epochs'"),
        ({"T": 2.0}, r"scheme\.params\.T: not a parameter of scheme 'qkd' any more"),
    ],
)
def test_bad_params_are_refused(given, match):
    with pytest.raises(ConfigError, match=match):
        params(**given)


@pytest.mark.parametrize("budget", [{"steps": 500}, {"min_steps": 500}])
def test_a_budget_in_steps_is_refused(budget):
    ctx = StubContext()
    ctx.cfg = load_config(ctx.cfg.model_dump(mode="json"), [f"train.{k}={v}" for k, v in budget.items()])
    with pytest.raises(ConfigError, match=r"qkd' splits train.epochs into its three phases"):
        QKD.run(ctx, 0, params())
    assert not ctx.stages


# ---------------------------------------------------------------- the plan


def test_phases_run_in_order_with_the_right_trainable_parts():
    ctx = StubContext(epochs=10)
    entries = QKD.run(ctx, 0, params(teacher_lr=1e-4))
    ss, cs, tu = ctx.stages
    assert [s["stage"] for s in ctx.stages] == ["qkd-ss-s0", "qkd-cs-s0", "qkd-s0"]
    assert [s["role"] for s in ctx.stages] == ["self_study", "co_study", "student"]
    assert [s["epochs"] for s in ctx.stages] == [3, 3, 4]
    assert [e["name"] for e in entries] == ["qkd-s0", "qkd-cs-s0", f"qkd-cs-s0:{TEACHER}", "qkd-ss-s0"]

    student = ss["model"]  # self-studying: the student alone (cross-entropy), no teacher at all
    assert ss["student_start"] == state_hash(ctx.student(0))  # the baseline's (or the spec's checkpoint) weights
    assert cs["student_start"] == ss["student_end"] != ss["student_start"]  # CS continues from self-studying
    assert cs["models"]["student"] is student and tu["models"]["student"] is student  # one student, three phases

    teacher = cs["models"][TEACHER]  # co-studying: a trainable copy of the pre-trained teacher, its own part
    assert teacher is not ctx.pretrained and cs["teacher_start"] == ctx.pretrained_hash
    assert cs["fingerprint"] == ctx.pretrained_hash  # a resume must start from the same pre-trained teacher
    (main, main_params, main_opt), (name, teacher_params, teacher_opt) = cs["parts"]
    assert (main, name) == (MAIN, TEACHER)
    assert main_params == {id(p) for p in student.parameters()} and main_opt is None
    assert teacher_params == {id(p) for p in teacher.parameters()}
    assert teacher_opt.lr == 1e-4 and teacher_opt.name == ctx.cfg.train.optimizer.name
    assert cs["teacher_trainable"]
    assert [t.view for t in cs["teachers"]] == [TEACHER, "student"]  # each learns from the other, detached

    ((only, tu_params, _),) = tu["parts"]  # tutoring: the co-studied teacher, frozen
    assert only == MAIN
    assert tu_params == {id(p) for p in student.parameters()}
    (frozen,) = tu["teachers"]
    assert isinstance(frozen, Frozen) and frozen.model is teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    assert tu["fingerprint"] == state_hash(teacher) != ctx.pretrained_hash  # the co-studied weights teach
    assert state_hash(ctx.pretrained) == ctx.pretrained_hash  # the run's teacher (shared by seeds) is untouched
    assert tu["label"] == cs["label"] == "qkd"


def test_without_co_studying_the_pre_trained_teacher_tutors_and_without_self_studying_cs_starts():
    ctx = StubContext(epochs=6)
    QKD.run(ctx, 1, params(self_study_epochs=2, co_study_epochs=0, tutor_epochs=4))
    assert [(s["stage"], s["epochs"]) for s in ctx.stages] == [("qkd-ss-s1", 2), ("qkd-s1", 4)]
    assert ctx.stages[1]["teachers"][0].model is ctx.pretrained

    ctx = StubContext(epochs=6)
    QKD.run(ctx, 0, params(self_study_epochs=0, co_study_epochs=3, tutor_epochs=3))
    assert [s["stage"] for s in ctx.stages] == ["qkd-cs-s0", "qkd-s0"]
    assert ctx.stages[0]["student_start"] == state_hash(ctx.student(0))  # co-studying starts from the student's init
    assert ctx.stages[0]["parts"][1][2] is None  # no teacher_lr: the stage's optimizer


@pytest.mark.parametrize(
    "ctx_args,match",
    [
        ({"teacher": False}, r"scheme 'qkd' needs a pre-trained full-precision teacher: add a `teacher:` section"),
        ({"losses": {"ce": {}}}, r"scheme 'qkd': none of the losses \['ce'\] reads a teacher"),
        ({"epochs": 2}, r"train\.epochs=2 is too few"),
    ],
)
def test_recipes_it_cannot_train_fail_before_any_phase(ctx_args, match):
    ctx = StubContext(**ctx_args)
    with pytest.raises(ConfigError, match=match):
        QKD.run(ctx, 0, params())
    assert ctx.stages == []


def test_co_studying_steps_each_model_on_its_own_loss():
    ctx = StubContext()
    torch.manual_seed(1)
    student = create_model("mlp", num_classes=10, input_shape=(40,), hidden=[8])
    teacher = create_model("mlp", num_classes=10, input_shape=(40,), hidden=[32])
    task = co_study_task(ctx, student, teacher, state_hash(teacher), None, ctx.cfg.train.optimizer)
    b = batch()
    task.setup(b)
    z_s, z_t = student(b.x), teacher(b.x)  # (B, K) each; MLPs: the same outputs in the task's steps
    for part, learner, other, suffix in ((MAIN, student, teacher, ""), (TEACHER, teacher, student, f"@{TEACHER}")):
        task.module.zero_grad(set_to_none=True)
        loss, terms = task.training_step(task.module, b, 0.0, part)
        loss.backward()
        z_l, z_o = (z_s, z_t) if learner is student else (z_t, z_s)
        expected = cross_entropy(z_l, b.y) + kd_soft_loss(z_l, z_o.detach(), 2.0)  # CE + tau^2 KL(p_o || p_l)
        assert torch.allclose(loss, expected, atol=1e-6)
        assert set(terms) == {f"ce{suffix}", f"kd{suffix}"}
        hand = torch.autograd.grad(expected, list(learner.parameters()), retain_graph=True)
        assert all(torch.allclose(p.grad, h, atol=1e-6) for p, h in zip(learner.parameters(), hand))
        assert all(p.grad is None for p in other.parameters())  # the other model's outputs are a constant
    assert set(task.flow.term_names()) == {"ce", "kd", f"ce@{TEACHER}", f"kd@{TEACHER}"}


def test_a_discriminator_loss_is_refused_in_co_studying():
    ctx = StubContext(losses={"ce": {}, "adversarial_kd": {"hidden": [8]}})
    student = create_model("mlp", num_classes=10, input_shape=(40,), hidden=[8])
    teacher = create_model("mlp", num_classes=10, input_shape=(40,), hidden=[32])
    task = co_study_task(ctx, student, teacher, "h", None, ctx.cfg.train.optimizer)
    task.setup(batch())
    with pytest.raises(ConfigError, match=r"co-studying trains the student and the teacher with one optimizer each"):
        task.parts()


# ---------------------------------------------------------------- real runs: bookkeeping and resume


def recipe(**changes: Any):
    raw = deep_merge(
        TINY,
        {
            "seeds": [0],
            "student": STUDENT,
            "losses": LOSSES,
            "data": {"params": {"num_samples": 300}, "batch_size": 60},
            "teacher": {"train": {"epochs": 1}},
            "train": {"epochs": 5, "scheduler": {"name": "constant"}},
            "scheme": {
                "name": "qkd",
                "params": {"self_study_epochs": 1, "co_study_epochs": 2, "tutor_epochs": 2, "teacher_lr": 0.002},
            },
        },
    )
    return load_config(deep_merge(raw, changes))


def co_studied_teacher(run_dir) -> dict[str, torch.Tensor]:
    state = safe_load(run_dir / "qkd-cs-s0" / "last.pt")["module"]
    return {k[len(TEACHER) + 1 :]: v for k, v in state.items() if k.startswith(f"{TEACHER}.")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One full run (teacher, SS, CS, TU), with each stage's frozen/co-studied teacher hashed before and after."""
    from darkknowledge.engine.trainer import Trainer

    seen: dict[str, dict[str, str]] = {}
    original = Trainer.fit

    def fit(self, resume=False):
        task = self.task
        watched = {t.name: t.model for t in getattr(task, "teachers", []) if isinstance(t, Frozen)}
        if isinstance(task, CoStudyTask):
            watched[TEACHER] = task.flow.get_submodule(TEACHER)
        before = {n: state_hash(m) for n, m in watched.items()}
        result = original(self, resume)
        seen[self.stage] = {n: (before[n], state_hash(m)) for n, m in watched.items()}
        return result

    mp = pytest.MonkeyPatch()
    mp.setenv("DK_CACHE", str(tmp_path_factory.getbasetemp() / "dk-cache"))  # conftest's, set before it runs
    mp.setattr(Trainer, "fit", fit)
    try:
        run_dir = tmp_path_factory.mktemp("qkd") / "ref"
        commands.distill(recipe(), out=run_dir, progress=False)
    finally:
        mp.undo()
    return run_dir, seen


def test_each_phase_is_a_stage_with_its_epochs_and_teachers(reference):
    run_dir, seen = reference
    rows = results(run_dir)
    ss, cs, tu, peer = rows["qkd-ss-s0"], rows["qkd-cs-s0"], rows["qkd-s0"], rows[f"qkd-cs-s0:{TEACHER}"]
    assert [ss["role"], cs["role"], tu["role"], peer["role"]] == ["self_study", "co_study", "student", TEACHER]
    assert [ss["epochs"], cs["epochs"], tu["epochs"]] == [1, 2, 2] and peer["member_of"] == "qkd-cs-s0"
    assert cs["scheme"] == tu["scheme"] == "qkd" and ss["teacher_hash"] is None
    n = ss["steps"]  # batches per epoch (one optimizer step each)
    assert cs["steps"] == 2 * n and tu["steps"] == 2 * n  # several parts count batches
    _, pretrained = load_exported(run_dir / "teacher" / "model.pt")
    co_studied = co_studied_teacher(run_dir)
    assert cs["teacher_hash"] == state_hash(pretrained)  # co-studying starts from the pre-trained teacher
    assert tu["teacher_hash"] == state_hash(co_studied) != state_hash(pretrained)  # the co-studied one tutors
    before, after = seen["qkd-cs-s0"][TEACHER]
    assert before == state_hash(pretrained) and after == state_hash(co_studied)  # trained in co-studying
    before, after = seen["qkd-s0"][TEACHER]
    assert before == after == state_hash(co_studied)  # frozen in tutoring
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [m for m in metrics if m.get("stage") == "qkd-cs-s0" and m.get("kind") == "train"]
    assert [m["epoch"] for m in lrs] == [1, 2]
    assert all(m[f"lr/{TEACHER}"] == pytest.approx(0.002) and m["lr/main"] == pytest.approx(0.005) for m in lrs)
    assert {f"train/{TEACHER}/ce@{TEACHER}", f"train/{TEACHER}/kd@{TEACHER}", "train/main/kd"} <= set(lrs[0])
    trained = [m["stage"] for m in metrics if m.get("kind") == "train" and m["stage"].startswith("qkd")]
    assert trained == ["qkd-ss-s0", "qkd-cs-s0", "qkd-cs-s0", "qkd-s0", "qkd-s0"]  # phases in order


@pytest.mark.parametrize("phase,call", [("co-studying", "cs"), ("tutoring", "tu")])
def test_a_run_killed_mid_phase_resumes_to_identical_weights(reference, tmp_path, monkeypatch, phase, call):
    ref, _ = reference
    rows = results(ref)
    n = rows["qkd-ss-s0"]["steps"]
    # calls of FlowTask.training_step: SS n, CS 2 per batch (student, then teacher), TU n per epoch;
    # stop in the second epoch of the phase, after its first checkpoint
    stop = n + 2 * n + 2 if call == "cs" else n + 4 * n + n + 1
    calls = {"n": 0}
    original = FlowTask.training_step

    def interrupt(self, model, batch, progress, part=MAIN):
        calls["n"] += torch.is_grad_enabled()  # the preflight's dry steps run without gradients
        if calls["n"] == stop:
            raise KeyboardInterrupt
        return original(self, model, batch, progress, part)

    monkeypatch.setattr(FlowTask, "training_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        commands.distill(recipe(), out=tmp_path / "cut", progress=False)
    monkeypatch.setattr(FlowTask, "training_step", original)
    cut = results(tmp_path / "cut")
    assert ("qkd-cs-s0" in cut) == (call == "tu") and "qkd-s0" not in cut, f"killed outside {phase}"
    stopped = "qkd-cs-s0" if call == "cs" else "qkd-s0"
    assert safe_load(tmp_path / "cut" / stopped / "last.pt")["epoch"] == 1
    commands.distill(recipe(), out=tmp_path / "cut", resume=True, progress=False)
    _, a = load_exported(ref / "student.pt")
    _, b = load_exported(tmp_path / "cut" / "student.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta, tb = co_studied_teacher(ref), co_studied_teacher(tmp_path / "cut")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert results(tmp_path / "cut")["qkd-s0"]["teacher_hash"] == rows["qkd-s0"]["teacher_hash"]


def test_a_finished_run_cannot_be_extended_by_resume(tmp_path):
    """The phases share one student: a longer self-study after co-studying trained would be lost."""
    raw = recipe().model_dump(mode="json")
    raw["scheme"]["params"] = {"teacher_lr": 0.002}  # the default 30/30/40 split of train.epochs
    raw["train"]["epochs"] = 3  # phases 1, 1, 1
    commands.distill(load_config(raw), out=tmp_path / "run", progress=False)
    raw["train"]["epochs"] = 6  # phases 2, 2, 2
    with pytest.raises(
        ConfigError,
        match=r"stage 'qkd-ss-s0' trained 1 epochs and this run asks for 2.*cannot be "
        r"extended by --resume",
    ):
        commands.distill(load_config(raw), out=tmp_path / "run", resume=True, progress=False)
