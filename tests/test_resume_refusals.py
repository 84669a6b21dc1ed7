"""--resume checks what it resumes: the folder, the command, the config and the teachers; and
``train.epochs`` may grow to extend a finished run."""

import json

import pytest
import torch
import yaml

import darkknowledge as dk_api
from darkknowledge.cli import main
from darkknowledge.config import RunConfig, load_config
from darkknowledge.errors import ConfigError
from darkknowledge.runs.resume import config_changes
from darkknowledge.runs.rundir import choose_run_dir
from darkknowledge.runs.session import Session
from helpers import results, write_recipe

SMALL = {"data": {"params": {"num_samples": 600}}, "train": {"epochs": 1}, "teacher": {"train": {"epochs": 1}}}


pytestmark = pytest.mark.usefixtures("restore_logging")  # see conftest.py


@pytest.fixture()
def recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return str(write_recipe(tmp_path / "r.yaml", **SMALL))


def _cli(capsys, *args):
    """``dk ARGS`` in this process: (exit code, the one error line or the whole stderr)."""
    code = main(list(args))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dk: error:")]
    assert "Traceback" not in err and len(errors) <= 1, err
    return code, (errors[0] if errors else err)


def _snapshot(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_a_changed_config_is_refused_with_the_diff(recipe, tmp_path, capsys):
    assert _cli(capsys, "train", recipe, "--out", "t", "--quiet")[0] == 0
    before = _snapshot(tmp_path / "t")
    code, line = _cli(
        capsys, "train", recipe, "train.optimizer.lr=1e-2", "losses.ce.weight=0.5", "--out", "t", "--resume", "--quiet"
    )
    assert code == 2
    assert line.startswith("dk: error: refusing to resume 't': config differs: ")
    assert "train.optimizer.lr 0.005 -> 0.01" in line  # 1e-2 read as a number
    assert "Safe to change on resume: train.epochs (to extend, not shorten)" in line
    assert _snapshot(tmp_path / "t") == before  # config.yaml still records the run as it was trained


def test_safe_keys_and_settings_of_a_newer_version_are_no_difference():
    recorded = RunConfig(train={"epochs": 3}).model_dump(mode="json")
    del recorded["train"]["keep_host_memory"]  # as if written before that setting existed
    current = RunConfig(
        train={"epochs": 5, "device": "cpu", "checkpoint_every_steps": 7},
        teacher={"name": "cnn1d", "checkpoint": "moved/teacher.pt"},
    ).model_dump(mode="json")
    recorded["teacher"] = {**current["teacher"], "checkpoint": "teacher.pt"}
    refused, allowed = config_changes(recorded, current)
    assert refused == []
    assert allowed == [
        "teacher.checkpoint 'teacher.pt' -> 'moved/teacher.pt'",
        "train.epochs 3 -> 5",
        "train.device 'auto' -> 'cpu'",
        "train.checkpoint_every_steps null -> 7",
    ]
    current["train"]["scheduler"]["name"] = "constant"
    current["losses"] = {"kd": {"T": 2}}
    refused, _ = config_changes(recorded, current)
    assert refused == ["train.scheduler.name 'cosine' -> 'constant'", "losses.kd.T (unset) -> 2"]


def test_resume_of_a_folder_that_does_not_exist_is_an_error(recipe, tmp_path, capsys):
    code, line = _cli(capsys, "train", recipe, "--out", "typo", "--resume", "--quiet")
    assert code == 2
    assert "--resume: run folder 'typo' does not exist, so there is nothing to resume" in line
    assert not (tmp_path / "typo").exists()
    with pytest.raises(ConfigError, match="no run folder to continue"):
        Session(load_config(recipe), None, resume=True)


def test_resume_without_out_takes_only_a_folder_of_the_same_command(recipe, tmp_path, capsys):
    assert _cli(capsys, "train", recipe, "--quiet")[0] == 0  # runs/tiny, by `dk train`
    code, line = _cli(capsys, "distill", recipe, "--resume", "--quiet")
    assert code == 2
    assert (
        "--resume: no run folder of dk distill (recipe 'tiny') under 'runs' to continue (found only "
        "runs/tiny (dk train --model student (recipe 'tiny')))"
    ) in line
    assert not (tmp_path / "runs" / "tiny" / "kd-s0").exists()

    runs = tmp_path / "runs"
    for folder, command in (("tiny-2", "distill"), ("tiny-3", "train")):
        (runs / folder).mkdir()
        (runs / folder / "run.json").write_text(json.dumps({"command": command, "model": None, "name": "tiny"}))
    (runs / "tiny-4").mkdir()  # no run.json: only resumed when named with --out
    identity = {"command": "distill", "model": None, "name": "tiny"}
    assert choose_run_dir("tiny", None, True, base=runs, identity=identity) == runs / "tiny-2"
    assert choose_run_dir("tiny", None, False, base=runs, identity=identity) == runs / "tiny-5"


def test_resume_of_another_commands_folder_is_refused(recipe, tmp_path, capsys):
    assert _cli(capsys, "train", recipe, "--out", "t", "--quiet")[0] == 0
    code, line = _cli(capsys, "train", recipe, "--model", "teacher", "--out", "t", "--resume", "--quiet")
    assert code == 2
    assert (
        "refusing to resume 't': it holds a run of dk train --model student (recipe 'tiny'), not of "
        "dk train --model teacher (recipe 'tiny')"
    ) in line
    assert set(results(tmp_path / "t")) == {"student-ce-s0"}


def test_a_teacher_changed_between_stages_is_refused(recipe, tmp_path, capsys):
    assert _cli(capsys, "train", recipe, "--model", "teacher", "--out", "t", "--quiet")[0] == 0
    teacher = tmp_path / "t" / "teacher.pt"
    assert _cli(capsys, "distill", recipe, f"teacher.checkpoint={teacher}", "--out", "d", "--quiet")[0] == 0
    moved = tmp_path / "moved.pt"  # the same teacher elsewhere resumes (its weights are what count)
    moved.write_bytes(teacher.read_bytes())
    assert _cli(capsys, "distill", recipe, f"teacher.checkpoint={moved}", "--out", "d", "--resume", "--quiet")[0] == 0

    payload = torch.load(teacher, weights_only=True)
    payload["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    other = tmp_path / "other.pt"
    torch.save(payload, other)
    before = results(tmp_path / "d")["kd-s0"]
    code, line = _cli(capsys, "distill", recipe, f"teacher.checkpoint={other}", "--out", "d", "--resume", "--quiet")
    assert code == 2
    assert f"refusing to resume 'd': stage 'kd-s0' finished with teacher weights {before['teacher_hash']}, " in line
    assert "delete 'd/kd-s0' to train that stage again against the new one" in line
    assert results(tmp_path / "d")["kd-s0"] == before


def test_shrinking_epochs_is_refused(recipe, tmp_path, capsys):
    assert _cli(capsys, "train", recipe, "train.epochs=2", "--out", "t", "--quiet")[0] == 0
    code, line = _cli(capsys, "train", recipe, "train.epochs=1", "--out", "t", "--resume", "--quiet")
    assert code == 2
    assert "config differs: train.epochs 2 -> 1 (a run can be extended, not shortened)" in line


def test_extending_epochs_of_a_teacher_trained_in_the_run_is_refused(recipe, tmp_path, capsys):
    raw = yaml.safe_load((tmp_path / "r.yaml").read_text())
    del raw["teacher"]["train"]["epochs"]  # the teacher trains train.epochs
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert _cli(capsys, "distill", recipe, "--out", "d", "--quiet")[0] == 0
    code, line = _cli(capsys, "distill", recipe, "train.epochs=2", "--out", "d", "--resume", "--quiet")
    assert code == 2
    assert "it also sets the epochs of teacher, trained in this run" in line and "teacher.train.epochs=1" in line


def test_extending_epochs_trains_the_extra_epochs_and_records_them(tmp_path):
    x = torch.randn(300, 6)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    data = ((x, y), (x[:100], y[:100]))
    kw = {
        "batch_size": 20,
        "lr": 0.01,
        "seed": 3,
        "config": {"train": {"deterministic": True, "device": "cpu", "scheduler": {"name": "constant"}}},
    }
    straight = dk_api.train("mlp", data, epochs=3, out=tmp_path / "straight", **kw)
    dk_api.train("mlp", data, epochs=2, out=tmp_path / "grown", **kw)
    grown = dk_api.train("mlp", data, epochs=3, out=tmp_path / "grown", resume=True, **kw)

    entry = grown.entry
    assert entry["epochs"] == 3 and entry["extended_from"] == 2 and entry["steps"] == straight.entry["steps"] == 45
    logged = [json.loads(line) for line in (tmp_path / "grown" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged if r["kind"] == "train"] == [1, 2, 3]
    assert yaml.safe_load((tmp_path / "grown" / "config.yaml").read_text())["train"]["epochs"] == 3
    # a constant schedule continues exactly: the same weights as a run planned for 3 epochs
    a, b = straight.model.state_dict(), grown.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert entry["last_acc"] == straight.accuracy
