"""The command line end to end: dk run/distill/train/eval/list, and bad input."""

import json

import pytest

from darkknowledge.cli import main
from helpers import dk, results, write_recipe


def test_list_shows_losses_models_datasets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("kd ", "ce ", "resnet32x4", "wrn_40_2", "mlp", "mnist1d", "digits", "quickstart", "offline"):
        assert word in out
    assert main(["list", "losses"]) == 0
    assert "Hinton" in capsys.readouterr().out
    assert main(["list", "views"]) == 0
    assert "downsample, flatten, profile, render" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.epoch=3"], "train.epoch: unknown key"),
        (["losses={kdd: {}}"], "unknown loss 'kdd'"),
        (["student.params.hidden=oops"], "student.params.hidden"),
        (["teacher.params.num_classes=7"], "predicts 7 classes but dataset 'mnist1d' has 10"),
    ],
)
def test_bad_config_exits_nonzero_and_writes_no_checkpoint(tmp_path, args, message):
    recipe = write_recipe(tmp_path / "r.yaml")
    proc = dk("distill", str(recipe), *args, "--out", "run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "run").rglob("*.pt")) if (tmp_path / "run").exists() else True


def test_unknown_tap_path_fails_before_training(tmp_path):
    from darkknowledge.errors import TapError
    from darkknowledge.losses import DistillLoss, Needs
    from darkknowledge.losses.objective import Objective
    from darkknowledge.models import create_model
    from darkknowledge.schemes.offline import offline_task

    class NeedsATap(DistillLoss):
        citation = "test"
        knowledge = "feature"
        needs_spec = Needs(teacher=True)  # reads the teacher (known before binding)

        def bind(self, student, teacher):
            return Needs(teacher=True, student_taps=("blocks.0",), teacher_taps=("blocks.7",))

    student = create_model("mlp", num_classes=3, input_shape=(4,))
    teacher = create_model("mlp", num_classes=3, input_shape=(4,))
    with pytest.raises(TapError, match=r"'blocks.7'.*Closest valid paths: 'blocks.1', 'blocks.0'"):
        offline_task(student, Objective({"t": NeedsATap()}), teacher)


@pytest.mark.slow
def test_dk_run_prints_table_and_writes_report(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    proc = dk("run", str(recipe), "--out", "cmp", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| model | role |" in proc.stdout and "baseline" in proc.stdout
    assert any(w in proc.stdout for w in ("Distillation helps", "Inconclusive", "did not help"))
    res = results(tmp_path / "cmp")
    assert set(res) == {"teacher", "baseline-s0", "baseline-s1", "kd-s0", "kd-s1"}
    for entry in res.values():
        for key in ("name", "role", "seed", "params", "best_acc", "last_acc", "train_seconds"):
            assert key in entry
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "± " in report and "Verdict" in report
    assert (tmp_path / "cmp" / "config.yaml").is_file()
    lines = (tmp_path / "cmp" / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(line)["stage"] for line in lines} == set(res)

    # a second run reuses the cached teacher and writes a new run folder
    again = dk("run", str(recipe), "train.epochs=1", "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "reused_from" in results(tmp_path / "runs" / "tiny")["teacher"]


@pytest.mark.slow
def test_distill_then_eval_the_exported_student(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    proc = dk("distill", str(recipe), "seed=1", "--out", "d", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    entry = results(tmp_path / "d")["kd-s1"]
    ev = dk("eval", str(tmp_path / "d" / "student.pt"), cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads(ev.stdout)
    assert metrics["model"] == "mlp" and abs(metrics["top1"] - entry["last_acc"]) < 1e-6
