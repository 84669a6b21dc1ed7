"""The verdict's measured causes (runs/diagnosis.py) and ``dk.distill(..., baseline=True)``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import darkknowledge as dk
from darkknowledge.runs.diagnosis import (
    MIN_STEPS,
    causes,
    is_memorised,
    loss_drop,
    memorised_warnings,
    teacher_lines,
)
from darkknowledge.runs.outcome import TrainResult
from darkknowledge.runs.report import group_rows, render_report, table_lines, verdict
from helpers import result_entry

pytestmark = pytest.mark.usefixtures("restore_logging")  # see conftest.py


def test_loss_drop_is_the_relative_fall_over_the_last_epoch():
    records = [
        {"kind": "train", "epoch": 1, "train/loss": 2.0},
        {"kind": "eval", "epoch": 1, "test": {}},
        {"kind": "train", "epoch": 2, "train/loss": 1.5},
        {"kind": "train", "epoch": 3, "train/loss": 1.0},  # cut short by a crash, then run again:
        {"kind": "train", "epoch": 3, "train/loss": 1.2},  # the later record counts
    ]
    assert loss_drop(records) == pytest.approx(100 * (1.5 - 1.2) / 1.5)
    assert loss_drop(records[:3]) == pytest.approx(25.0)
    assert loss_drop(records[:1]) is None  # one epoch: no trend
    rising = [{"kind": "train", "epoch": 1, "train/loss": 1.0}, {"kind": "train", "epoch": 2, "train/loss": 1.1}]
    assert loss_drop(rising) == pytest.approx(-10.0)


def test_loss_drop_of_many_short_epochs_compares_the_last_two_tenths():
    """A small set's epochs are a step each: their losses are noise, the trend is over tenths."""
    noisy = [2.0 if e % 2 else 1.0 for e in range(1, 41)]  # flat on average, +-50% from epoch to epoch
    records = [{"kind": "train", "epoch": e, "train/loss": v} for e, v in enumerate(noisy, 1)]
    assert loss_drop(records) == pytest.approx(0.0)  # epochs 33-36 against 37-40: the same mean
    falling = [{"kind": "train", "epoch": e, "train/loss": 100.0 - e} for e in range(1, 41)]
    assert loss_drop(falling) == pytest.approx(100 * ((100 - 34.5) - (100 - 38.5)) / (100 - 34.5))


def test_memorised_needs_both_a_perfect_training_accuracy_and_near_one_hot_outputs():
    assert is_memorised({"train_acc": 100.0, "train_confidence": 0.995})
    assert not is_memorised({"train_acc": 99.0, "train_confidence": 0.995})
    assert not is_memorised({"train_acc": 100.0, "train_confidence": 0.95})
    assert not is_memorised({"train_acc": 100.0})  # not measured: not claimed
    assert not is_memorised({"train_acc": 100.0, "train_confidence": float("nan")})


def _losing_run(**teacher: object) -> list[dict]:
    """A teacher, two baseline seeds and two student seeds where the student trails."""
    return [
        result_entry("teacher", "teacher", teacher.pop("acc", 70.5), seed=None, **teacher),
        result_entry("baseline-s0", "baseline", 70.0, seed=0),
        result_entry("baseline-s1", "baseline", 71.0, seed=1),
        result_entry("kd-s0", "student", 68.0, seed=0, steps=40, loss_drop=8.0),
        result_entry("kd-s1", "student", 69.0, seed=1, steps=40, loss_drop=6.0),
    ]


def test_causes_name_each_measured_cause_with_its_numbers():
    rows = group_rows(_losing_run(train_acc=100.0, train_confidence=0.996))
    found = causes(rows)
    assert len(found) == 3
    assert found[0].startswith("the teacher (cnn, 70.50%) is no better than the student alone (70.50%")
    assert "nothing to transfer" in found[0]
    assert "training accuracy 100.00%, mean top probability 0.996" in found[1] and "function matching" in found[1]
    assert f"it took 40 optimizer steps (under {MIN_STEPS})" in found[2]
    assert "still fell 7.0% at its end" in found[2]  # the mean over the seeds' 8.0 and 6.0


def test_no_cause_is_named_without_its_numbers():
    entries = _losing_run(acc=90.0, train_acc=100.0)  # a strong teacher; no train_confidence recorded
    for e in entries[3:]:
        e.update(steps=5000, loss_drop=1.0)  # a long budget whose loss has settled
    assert causes(group_rows(entries)) == []
    for e in entries[3:]:
        del e["loss_drop"]  # an older results.json: no trend recorded
    assert causes(group_rows(entries)) == []


def test_the_verdict_adds_causes_only_when_distillation_does_not_win():
    losing = verdict(group_rows(_losing_run()))
    assert losing.startswith("Distillation did not help")
    assert (
        losing.endswith("Likely causes (measured): " + "; ".join(causes(group_rows(_losing_run()))) + ".")
        and "nothing to transfer" in losing
    )
    winning = _losing_run()
    for e, acc in zip(winning[3:], (80.0, 81.0), strict=True):
        e["last_acc"] = acc
    text = verdict(group_rows(winning))
    assert text.startswith("Distillation helps") and "Likely" not in text


def test_a_memorised_teacher_is_warned_about_under_the_table():
    rows = group_rows(_losing_run(acc=95.0, train_acc=100.0, train_confidence=0.999))
    assert memorised_warnings(rows) == [
        "warning: the teacher cnn has memorised its training set (training accuracy 100.00%, mean top "
        "probability 0.999): its soft targets are near one-hot on the training set; function matching (mixed "
        "inputs) is what helps here"
    ]
    lines = render_report("t", rows).splitlines()
    table_end = max(i for i, line in enumerate(lines) if line.startswith("|"))
    assert lines[table_end + 2 : table_end + 4] == [
        "- teacher cnn: training split accuracy 100.00%, mean top probability 0.999",
        f"- {memorised_warnings(rows)[0]}",
    ]
    assert lines[table_end + 5].startswith("**Verdict.**")
    assert memorised_warnings(group_rows(_losing_run(train_acc=100.0, train_confidence=0.9))) == []


def test_the_report_states_each_teachers_calibration_and_training_fit():
    rows = group_rows(_losing_run(acc=95.0, ece=3.25, train_acc=97.5, train_confidence=0.9))
    assert teacher_lines(rows) == [
        "teacher cnn: ECE 3.25% on the test split (15 equal-width bins); training split accuracy 97.50%, "
        "mean top probability 0.900"
    ]
    assert "- " + teacher_lines(rows)[0] in render_report("t", rows).splitlines()
    assert teacher_lines(group_rows(_losing_run())) == []  # an older results.json: nothing to state


def test_a_result_with_a_baseline_prints_the_run_table_and_verdict():
    entries = _losing_run()
    teacher, base, student = entries[0], entries[1], entries[3]
    student["best_epoch"] = 3
    alone = TrainResult(nn.Linear(1, 1), {**base, "best_epoch": 3}, {}, teacher=teacher)
    result = TrainResult(nn.Linear(1, 1), student, {}, teacher=teacher, baseline=alone)
    rows = group_rows([teacher, alone.entry, student])
    assert result.verdict == verdict(rows)
    lines = result.lines()
    assert lines[0].startswith("kd-s0: test acc 68.00")
    assert lines[2:-2] == table_lines(rows) and lines[-1] == verdict(rows) and lines[-2] == ""
    assert "| mlp | baseline | ce |" in str(result)
    plain = TrainResult(nn.Linear(1, 1), student, {}, teacher=teacher)
    assert plain.verdict is None and plain.baseline is None and len(plain.lines()) == 1


class Tiny(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, width), nn.ReLU())
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.slow
def test_distill_with_a_baseline_trains_the_same_student_alone_and_says_why_it_lost(toy_tensors, tmp_path, monkeypatch):
    from darkknowledge.runs.session import Session

    starts: dict[str, dict[str, torch.Tensor]] = {}
    train_stage = Session.train_stage

    def watched(self, stage, role, task, seed, **kwargs):
        starts[stage] = {k: v.clone() for k, v in task.export_model().state_dict().items()}
        return train_stage(self, stage, role, task, seed, **kwargs)

    monkeypatch.setattr(Session, "train_stage", watched)
    torch.manual_seed(0)
    teacher = Tiny(16)  # untrained: about chance, so it has nothing to teach
    student = Tiny(8)
    initial = copy.deepcopy(student)
    settings = {"epochs": 3, "lr": 0.01, "batch_size": 32}
    mine = {"scheme": {"params": {"keep_better": False}}}  # the default objective, the distilled student delivered
    out = dk.distill(student, teacher, toy_tensors, out=tmp_path / "run", baseline=True, config=mine, **settings)

    assert (
        out.kept is None
        and out.model is student
        and isinstance(out.baseline, TrainResult)
        and out.baseline.model is not student
    )
    base = out.baseline.entry
    assert base["name"] == "baseline-s0" and base["role"] == "baseline" and base["losses"] == ["ce"]
    assert sorted(starts) == ["baseline-s0", "kd-s0"]
    assert all(torch.equal(v, starts["kd-s0"][k]) for k, v in starts["baseline-s0"].items())  # same init
    assert all(torch.equal(v, initial.state_dict()[k]) for k, v in starts["baseline-s0"].items())
    assert base["steps"] == out.entry["steps"] and base["epochs"] == out.entry["epochs"] == 3  # same budget

    # the baseline is exactly dk.train of the same initial student
    alone = dk.train(copy.deepcopy(initial), toy_tensors, **settings)
    assert alone.accuracy == out.baseline.accuracy
    assert all(torch.equal(v, out.baseline.model.state_dict()[k]) for k, v in alone.model.state_dict().items())

    # the given teacher is evaluated: its accuracy is the verdict's "nothing to transfer"
    (_, _), (x_test, y_test) = toy_tensors
    with torch.no_grad():
        teacher_acc = 100.0 * teacher(x_test).argmax(-1).eq(y_test).float().mean().item()
    assert out.teacher is not None and out.teacher["last_acc"] == pytest.approx(teacher_acc)
    assert out.teacher["source"] == "given" and 0.0 <= out.teacher["ece"] <= 100.0
    assert out.baseline.agreement is not None and out.agreement is not None  # both against the teacher

    rows = group_rows([out.teacher, base, out.entry])
    assert out.verdict == verdict(rows)
    assert out.verdict.startswith("Distillation did not help")
    assert f"the teacher (Tiny, {teacher_acc:.2f}%) is no better than the student alone" in out.verdict
    assert f"it took {out.entry['steps']} optimizer steps" in out.verdict
    printed = str(out).splitlines()
    assert printed[-1] == out.verdict and table_lines(rows)[0] in printed

    from helpers import results

    recorded = results(tmp_path / "run")
    assert {"teacher", "baseline-s0", "kd-s0"} <= set(recorded)
    assert recorded["baseline-s0"]["agreement"] == pytest.approx(out.baseline.agreement)


def test_measure_fit_is_the_accuracy_and_mean_top_probability_of_the_labeled_samples():
    from darkknowledge.data.batch import UNLABELED, Batch
    from darkknowledge.engine.distributed import DistContext
    from darkknowledge.engine.fidelity import measure_fit

    torch.manual_seed(0)
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    y[0] = UNLABELED  # a mixed sample has no label: not counted
    model = nn.Linear(5, 3)
    batches = [Batch(x=x[i : i + 4], y=y[i : i + 4], idx=torch.arange(i, min(i + 4, 10))) for i in range(0, 10, 4)]
    found = measure_fit(model, batches, DistContext())
    with torch.no_grad():
        p = model(x[1:]).softmax(-1)  # (9, 3)
    assert found is not None
    assert found["accuracy"] == pytest.approx(100.0 * p.argmax(-1).eq(y[1:]).float().mean().item())
    assert found["confidence"] == pytest.approx(p.max(-1).values.mean().item())


@pytest.mark.slow
def test_a_teacher_that_memorised_a_few_samples_is_measured_and_warned_about(toy_tensors):
    from darkknowledge.engine.fidelity import expected_calibration_error

    (x, y), (x_test, y_test) = toy_tensors
    few = ((x[:16], y[:16]), (x_test, y_test))  # 16 samples, 100 passes: memorised
    torch.manual_seed(0)
    out = dk.train(Tiny(64), few, epochs=100, lr=0.02, batch_size=16)
    with torch.no_grad():
        p = out.model(x[:16]).softmax(-1)  # (16, 4)
        test_logits = out.model(x_test)
    e = out.entry
    assert e["train_acc"] == pytest.approx(100.0 * p.argmax(-1).eq(y[:16]).float().mean().item())
    assert e["train_confidence"] == pytest.approx(p.max(-1).values.mean().item(), rel=1e-5)
    assert e["ece"] == pytest.approx(expected_calibration_error(test_logits, y_test), rel=1e-4)
    assert e["train_acc"] == 100.0 and e["train_confidence"] > 0.99
    printed = str(out).splitlines()
    assert printed[1] == (
        f"  calibration: ECE {e['ece']:.2f}% on the test split; training split: accuracy 100.00%, "
        f"mean top probability {e['train_confidence']:.3f}"
    )
    assert printed[2].startswith("  warning: the teacher Tiny has memorised its training set")

    # a teacher trained in the run on those samples: the report warns and the causes name it
    teacher = {"teacher": {"params": {"hidden": [64]}, "train": {"epochs": 100, "optimizer": {"lr": 0.02}}}}
    run = dk.distill("mlp", "mlp", few, epochs=2, batch_size=16, baseline=True, config=teacher)
    assert run.teacher is not None and run.teacher["train_acc"] == 100.0 and run.teacher["train_confidence"] > 0.99
    assert any(line.startswith("  warning: the teacher mlp has memorised") for line in str(run).splitlines())
    rows = run.rows()
    assert any("overconfident on its training set" in c for c in causes(rows))
    assert render_report("t", rows).count("warning: the teacher mlp has memorised") == 1
