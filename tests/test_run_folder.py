"""The run folder: one writer (a lock), files with the user's umask, clear errors for a bad
--out, a damaged results.json or a full disk, and a damaged model.pt rebuilt from last.pt."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from darkknowledge import commands
from darkknowledge.atomic import WriteError, atomic_write, file_mode
from darkknowledge.cli import main
from darkknowledge.config import load_config
from darkknowledge.engine.checkpoint import load_exported, safe_load
from darkknowledge.runs.lock import RunFolderBusyError, RunLock, holder
from helpers import dk, write_recipe

SMALL = {"data": {"params": {"num_samples": 600}}, "train": {"epochs": 1}}


pytestmark = pytest.mark.usefixtures("restore_logging")  # see conftest.py


def _recipe(tmp_path, **changes):
    return write_recipe(tmp_path / "r.yaml", **{**SMALL, **changes})


def _cli(capsys, *args):
    """``dk ARGS`` in this process: (exit code, stderr)."""
    code = main(list(args))
    return code, capsys.readouterr().err


def _error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("dk: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    file_mode.cache_clear()
    try:
        path = atomic_write(tmp_path / "sub" / "f.txt", lambda f: f.write("x"), binary=False)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
        assert (tmp_path / "sub").stat().st_mode & 0o777 == 0o777 & ~umask
    finally:
        os.umask(old)
        file_mode.cache_clear()


def test_a_full_disk_is_one_clear_error_and_keeps_the_old_file(tmp_path):
    path = atomic_write(tmp_path / "results.json", lambda f: f.write("old"), binary=False)

    def full(f):
        f.write("new, half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"no space left on the device .*previous version.*intact"):
        atomic_write(path, full, binary=False)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_run_folder_files_are_readable_by_others_under_umask_022(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    file_mode.cache_clear()
    try:
        code, err = _cli(capsys, "train", str(_recipe(tmp_path)), "--out", "t", "--quiet")
    finally:
        os.umask(old)
        file_mode.cache_clear()
    assert code == 0, err
    files = [p for p in (tmp_path / "t").rglob("*") if p.is_file()]
    assert {"config.yaml", "results.json", "run.json", "model.pt", "last.pt", "student.pt"} <= {p.name for p in files}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644)}


# ----------------------------------------------------------------------------- one writer
def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    recipe = _recipe(tmp_path)
    with RunLock(tmp_path / "d", "dk distill (test)"):
        second = dk("train", str(recipe), "--out", "d", "--quiet", cwd=tmp_path)
    assert second.returncode == 2, second.stderr
    line = _error_line(second.stderr)
    assert f"run folder 'd' is in use by pid {os.getpid()} (dk distill (test)" in line
    assert not any(p.is_dir() for p in (tmp_path / "d").iterdir())  # nothing trained
    assert not (tmp_path / "d" / "config.yaml").exists()  # nothing of the second run written


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    code = (
        "import sys, time; from darkknowledge.runs.lock import RunLock; "
        f"lock = RunLock({str(tmp_path / 'd')!r}, 'dk run (killed)').acquire(); "
        "print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusyError, match=rf"in use by pid {proc.pid} \(dk run \(killed\)"):
            RunLock(tmp_path / "d", "second").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert holder(tmp_path / "d")["pid"] == proc.pid  # the dead holder's record is still there ...
    lock = RunLock(tmp_path / "d", "after the kill").acquire()  # ... and does not block
    assert holder(tmp_path / "d")["pid"] == os.getpid()
    lock.release()


def test_the_lock_is_per_process_and_released_by_its_last_holder(tmp_path):
    probe = (
        "import sys; from darkknowledge.runs.lock import RunLock, RunFolderBusyError\n"
        f"try:\n    lock = RunLock({str(tmp_path)!r}, 'probe').acquire()\n"
        "except RunFolderBusyError:\n    sys.exit(3)"
    )

    def other_process_can_lock():
        return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0

    first = RunLock(tmp_path, "first").acquire()
    second = RunLock(tmp_path, "second").acquire()  # the same process may open the folder again
    first.release()
    assert not other_process_can_lock()
    second.release()
    assert other_process_can_lock()


# ----------------------------------------------------------------------------- bad --out, bad results.json
def test_out_that_is_a_file_or_below_a_file_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    code, err = _cli(capsys, "train", str(recipe), "--out", "afile", "--quiet")
    assert code == 2 and "run folder 'afile' is a file, not a folder" in _error_line(err)
    code, err = _cli(capsys, "train", str(recipe), "--out", "afile/run", "--quiet")
    assert code == 2 and "run folder 'afile/run' cannot be created or written" in _error_line(err)
    code, err = _cli(capsys, "train", str(recipe), "--out", "", "--quiet")
    assert code == 2 and "--out: empty path" in _error_line(err)
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root may write any folder, so it cannot be made unwritable (see the file-path cases)",
)
def test_unwritable_out_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ro").mkdir(mode=0o500)
    code, err = _cli(capsys, "train", str(_recipe(tmp_path)), "--out", "ro/run", "--quiet")
    assert code == 2 and "cannot be created or written (Permission denied)" in _error_line(err)


def test_a_new_run_does_not_write_into_a_folder_holding_another(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path)
    assert _cli(capsys, "train", str(recipe), "--out", "t", "--quiet")[0] == 0
    before = (tmp_path / "t" / "results.json").read_text()
    code, err = _cli(capsys, "train", str(recipe), "seed=1", "--out", "t", "--quiet")
    assert code == 2
    assert (
        "run folder 't' already holds a run (trained: student-ce-s0, student.pt); continue it with --resume"
        in _error_line(err)
    )
    assert (tmp_path / "t" / "results.json").read_text() == before


def test_a_truncated_results_json_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path)
    assert _cli(capsys, "train", str(recipe), "--out", "t", "--quiet")[0] == 0
    path = tmp_path / "t" / "results.json"
    path.write_text(path.read_text()[:40])
    code, err = _cli(capsys, "train", str(recipe), "--out", "t", "--resume", "--quiet")
    assert code == 2
    line = _error_line(err)
    assert "cannot read 't/results.json'" in line and "Delete it and run again with --resume" in line

    path.unlink()  # the advice works: the finished stage is rebuilt from its last.pt, nothing retrains
    code, err = _cli(capsys, "train", str(recipe), "--out", "t", "--resume", "--quiet")
    assert code == 0, err
    assert [m["name"] for m in json.loads(path.read_text())["models"]] == ["student-ce-s0"]


# ----------------------------------------------------------------------------- recovery
def test_a_damaged_model_pt_of_a_finished_stage_is_rebuilt_from_last_pt(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(_recipe(tmp_path)))
    first = commands.train(cfg, out="t", progress=False)
    stage = tmp_path / "t" / "student-ce-s0"
    _, weights = load_exported(stage / "model.pt")
    (stage / "model.pt").write_bytes(b"PK\x03\x04 half a zip")
    caplog.set_level("WARNING", logger="darkknowledge")
    again = commands.train(cfg, out="t", resume=True, progress=False)
    assert "model.pt" in caplog.text and "rebuilding its model.pt from the stage's last.pt" in caplog.text
    _, rebuilt = load_exported(stage / "model.pt")  # whole again, with the stage's final weights
    assert rebuilt.keys() == weights.keys() and all(torch.equal(rebuilt[k], weights[k]) for k in weights)
    assert again["student"]["last_acc"] == first["student"]["last_acc"]
    assert again["student"]["steps"] == first["student"]["steps"]
    assert safe_load(stage / "last.pt")["epoch"] == 1  # nothing trained again


def test_a_damaged_model_pt_without_last_pt_says_what_to_delete(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path)
    assert _cli(capsys, "train", str(recipe), "--out", "t", "--quiet")[0] == 0
    stage = tmp_path / "t" / "student-ce-s0"
    (stage / "last.pt").unlink()
    (stage / "model.pt").write_bytes(b"garbage")
    code, err = _cli(capsys, "train", str(recipe), "--out", "t", "--resume", "--quiet")
    assert code == 2
    assert "Delete the folder 't/student-ce-s0' to train stage 'student-ce-s0' again" in _error_line(err)
    for p in stage.iterdir():
        p.unlink()
    stage.rmdir()
    code, err = _cli(capsys, "train", str(recipe), "--out", "t", "--resume", "--quiet")  # and deleting it works
    assert code == 0, err
    assert (stage / "model.pt").is_file()
