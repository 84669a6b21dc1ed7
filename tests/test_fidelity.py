"""Fidelity to the teacher (agreement, KL(T‖S)) and calibration (ECE): hand computations, the report, a real run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from darkknowledge.data.batch import UNLABELED, Batch
from darkknowledge.engine.distributed import DistContext
from darkknowledge.engine.fidelity import (
    agreement,
    expected_calibration_error,
    kl_to_teacher,
    measure_calibration,
    measure_fidelity,
)
from darkknowledge.runs.outcome import TrainResult, summary_lines
from darkknowledge.runs.report import group_rows, render_report, table_lines
from helpers import result_entry

pytestmark = pytest.mark.usefixtures("restore_logging")  # see conftest.py


def _two_class(confidences: list[float]) -> torch.Tensor:
    """(B, 2) logits whose softmax puts ``c`` on class 0."""
    return torch.tensor([[math.log(c), math.log(1 - c)] for c in confidences])


def test_agreement_counts_samples_whose_argmaxes_match():
    student = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 5.0, 1.0]])
    teacher = torch.tensor([[3.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
    assert agreement(student, teacher) == pytest.approx(50.0)  # samples 0 and 3
    assert agreement(teacher, teacher) == 100.0


def test_kl_is_from_the_teacher_to_the_student_at_temperature_one():
    teacher = torch.zeros(1, 2)  # p_T = (0.5, 0.5)
    student = torch.tensor([[math.log(3.0), 0.0]])  # p_S = (0.75, 0.25)
    t_first = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    s_first = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_to_teacher(student, teacher) == pytest.approx(t_first, abs=1e-6)
    assert abs(t_first - s_first) > 1e-3  # the direction is what is checked
    # mean over samples: a second, identical pair of samples adds 0
    both_s, both_t = torch.cat([student, torch.ones(1, 2)]), torch.cat([teacher, torch.ones(1, 2)])
    assert kl_to_teacher(both_s, both_t) == pytest.approx(t_first / 2, abs=1e-6)
    assert kl_to_teacher(teacher + 3.0, teacher) == pytest.approx(0.0, abs=1e-7)  # shift-invariant


def test_ece_matches_a_hand_computation_over_equal_width_bins():
    logits = _two_class([0.9, 0.9, 0.7])  # all predict class 0
    labels = torch.tensor([0, 1, 0])  # right, wrong, right
    # 15 bins: the two 0.9s share bin (13/15, 14/15], 0.7 is alone in (10/15, 11/15]
    hand = 2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(1.0 - 0.7)
    assert expected_calibration_error(logits, labels) == pytest.approx(100 * hand, abs=1e-4)
    # one bin: |accuracy - mean confidence|
    assert expected_calibration_error(logits, labels, bins=1) == pytest.approx(100 * abs(2 / 3 - 2.5 / 3), abs=1e-4)
    # a perfectly calibrated set: confidence 0.75, right on 3 of 4
    calibrated = _two_class([0.75] * 4)
    assert expected_calibration_error(calibrated, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-5)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[Batch]:
    return [
        Batch(x=x[i : i + size], y=y[i : i + size], idx=torch.arange(i, min(i + size, len(x))))
        for i in range(0, len(x), size)
    ]


def test_the_passes_add_batches_and_match_the_whole_split_and_restore_modes():
    torch.manual_seed(0)
    x, y = torch.randn(23, 5), torch.randint(0, 3, (23,))
    student, teacher = nn.Linear(5, 3), nn.Linear(5, 3)
    student.train()
    teacher.eval()
    with torch.no_grad():
        s, t = student(x), teacher(x)
    found = measure_fidelity(student, teacher, _batches(x, y, 4), DistContext())
    assert found is not None
    assert found["agreement"] == pytest.approx(agreement(s, t))
    assert found["kl_to_teacher"] == pytest.approx(kl_to_teacher(s, t), rel=1e-5)
    assert student.training and not teacher.training  # as they came
    y_part = y.clone()
    y_part[:3] = UNLABELED  # unlabeled samples do not count for calibration
    ece = measure_calibration(teacher, _batches(x, y_part, 4), DistContext())
    assert ece == pytest.approx(expected_calibration_error(t[3:], y[3:]), rel=1e-5)


def test_outputs_of_other_sizes_are_not_measured():
    x, y = torch.randn(6, 5), torch.zeros(6, dtype=torch.long)
    assert measure_fidelity(nn.Linear(5, 3), nn.Linear(5, 4), _batches(x, y, 4), DistContext()) is None


def test_the_report_shows_agreement_and_kl_as_mean_and_std_and_dashes_where_missing():
    entries = [
        result_entry("teacher", "teacher", 90.0, 0),
        result_entry("baseline-s0", "baseline", 70.0, 0, agreement=72.0, kl_to_teacher=0.5),
        result_entry("baseline-s1", "baseline", 72.0, 1, agreement=74.0, kl_to_teacher=0.7),
        result_entry("kd-s0", "student", 75.0, 0, agreement=80.0, kl_to_teacher=0.2),
        result_entry("kd-s1", "student", 77.0, 1, agreement=84.0, kl_to_teacher=0.3),
    ]
    lines = table_lines(group_rows(entries))
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[6:8] == ["agree %", "KL(T‖S)"]
    cells = {row.split("|")[2].strip(): [c.strip() for c in row.strip("|").split("|")] for row in lines[2:]}
    assert cells["teacher"][6:8] == ["-", "-"]
    assert cells["baseline"][6:8] == ["73.00 ± 1.41", "0.600 ± 0.141"]
    assert cells["student"][6:8] == ["82.00 ± 2.83", "0.250 ± 0.071"]
    assert "Fidelity (Stanton et al." in render_report("t", group_rows(entries))


def test_entries_without_fidelity_keep_the_earlier_table():
    old = [
        result_entry("teacher", "teacher", 90.0, 0),
        result_entry("b-s0", "baseline", 70.0, 0),
        result_entry("k-s0", "student", 75.0, 0),
    ]
    lines = table_lines(group_rows(old))
    assert "agree %" not in lines[0] and lines[0].count("|") == 10  # the nine earlier columns
    assert "Fidelity" not in render_report("t", group_rows(old))


def test_train_result_carries_and_prints_fidelity():
    entry = result_entry("kd-s0", "student", 75.0, 0, agreement=80.5, kl_to_teacher=0.1234)
    entry["best_epoch"] = 2
    teacher = result_entry("teacher", "teacher", 90.0, 0, ece=3.25)
    result = TrainResult(nn.Linear(1, 1), entry, {}, teacher=teacher)
    assert result.agreement == 80.5 and result.kl_to_teacher == 0.1234
    lines = result.lines()
    assert lines[0].endswith("; teacher 90.00 (ECE 3.25%)")
    assert lines[1] == "  fidelity: agrees with the teacher on 80.50% of test samples, KL(teacher‖model) 0.1234"
    bare = TrainResult(nn.Linear(1, 1), result_entry("b-s0", "baseline", 70.0, 0), {})
    assert bare.agreement is None and bare.kl_to_teacher is None
    assert len(summary_lines(bare.entry)) == 1


@pytest.mark.slow
def test_a_run_records_fidelity_that_the_saved_models_reproduce(tmp_path):
    from darkknowledge import commands
    from darkknowledge.config import load_config
    from darkknowledge.engine.checkpoint import load_exported, load_weights
    from darkknowledge.runs.build import build_data, build_model, make_loaders
    from helpers import TINY, results

    cfg = load_config(TINY, ["train.epochs=1", "teacher.train.epochs=1"])
    out = commands.compare(cfg, out=tmp_path / "run", progress=False)
    found = results(tmp_path / "run")
    teacher_entry = found["teacher"]
    assert 0.0 <= teacher_entry["ece"] <= 100.0 and 0.0 <= teacher_entry["train_acc"] <= 100.0
    assert 0.1 <= teacher_entry["train_confidence"] <= 1.0  # the mean top probability of 10 classes
    assert "agreement" not in teacher_entry
    for seed in cfg.seeds:
        for role, name in (("baseline", f"baseline-s{seed}"), ("student", f"kd-s{seed}")):
            assert found[name]["role"] == role
            assert 0.0 <= found[name]["agreement"] <= 100.0 and found[name]["kl_to_teacher"] >= 0.0
    head = out["table"][0]
    assert "agree %" in head and "KL(T‖S)" in head
    report = (tmp_path / "run" / "report.md").read_text()
    assert "agree %" in report and " ± " in out["table"][3]  # two seeds: mean ± std
    assert out["teachers"][0].startswith(f"teacher cnn1d: ECE {teacher_entry['ece']:.2f}% on the test split")
    assert f"- {out['teachers'][0]}" in report.splitlines()

    # recompute the student's agreement from the saved models on the test split
    bundle = build_data(cfg)
    info = bundle.info
    teacher = build_model(cfg.teacher, info, "teacher")
    load_weights(teacher, load_exported(tmp_path / "run" / "teacher" / "model.pt")[1], "teacher")
    student = build_model(cfg.student, info, "student")
    load_weights(student, load_exported(tmp_path / "run" / "kd-s0" / "model.pt")[1], "student")
    _, test_loader, _ = make_loaders(cfg, bundle, 0, torch.device("cpu"), DistContext(), train=False)
    teacher.eval()
    student.eval()
    with torch.no_grad():
        pairs = [(student(b.x), teacher(b.x)) for b in test_loader]
    s = torch.cat([p[0] for p in pairs])
    t = torch.cat([p[1] for p in pairs])
    assert found["kd-s0"]["agreement"] == pytest.approx(agreement(s, t))
    assert found["kd-s0"]["kl_to_teacher"] == pytest.approx(kl_to_teacher(s, t), rel=1e-4)
