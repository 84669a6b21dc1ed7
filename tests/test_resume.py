"""Interrupted runs resume to the same result as uninterrupted ones; a different teacher is refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from darkknowledge.engine.checkpoint import load_exported, safe_load
from helpers import dk, results, write_recipe

pytestmark = pytest.mark.slow


def _wait_for_epoch(metrics, stage, epoch, proc, limit=300.0):
    start = time.time()
    while time.time() - start < limit:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {stage} epoch {epoch}: {proc.stderr.read()}")
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("stage") == stage and rec.get("kind") == "train" and rec.get("epoch") == epoch:
                    return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_killed_distill_resumes_to_identical_result(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", data={"params": {"transfer_samples": 6000}}, train={"epochs": 4})
    full = dk("distill", str(recipe), "--out", "full", "--quiet", cwd=tmp_path)
    assert full.returncode == 0, full.stderr

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "darkknowledge.cli", "distill", str(recipe), "--out", "cut", "--quiet"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_epoch(tmp_path / "cut" / "metrics.jsonl", "kd-s0", 2, proc)
    proc.send_signal(signal.SIGKILL)  # a hard crash mid-run: nothing gets to clean up
    proc.wait()
    assert "kd-s0" not in results(tmp_path / "cut"), "the run finished before it was killed"
    state = safe_load(tmp_path / "cut" / "kd-s0" / "last.pt")  # the checkpoint left behind is whole
    assert 1 <= state["epoch"] < 4  # killed during epoch 2 or 3 of 4

    resumed = dk("distill", str(recipe), "--out", "cut", "--resume", "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = results(tmp_path / "full")["kd-s0"], results(tmp_path / "cut")["kd-s0"]
    assert a["last_acc"] == b["last_acc"] and a["best_acc"] == b["best_acc"] and a["steps"] == b["steps"]
    _, wa = load_exported(tmp_path / "full" / "student.pt")
    _, wb = load_exported(tmp_path / "cut" / "student.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_mid_epoch_checkpoint_resume_in_process(tmp_path, monkeypatch):
    """With train.checkpoint_every_steps the run resumes inside an epoch, batch for batch."""
    import darkknowledge as dk_api
    from darkknowledge.schemes.task import FlowTask

    x = torch.randn(300, 6)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    data = ((x, y), (x[:100], y[:100]))
    kw = dict(
        epochs=2,
        batch_size=20,
        lr=0.01,
        seed=3,
        config={"train": {"checkpoint_every_steps": 4, "deterministic": True, "device": "cpu"}},
    )
    reference = dk_api.train("mlp", data, out=tmp_path / "ref", **kw)

    original = FlowTask.training_step
    calls = {"n": 0}

    def crash_at_step_23(self, model, batch, progress):
        calls["n"] += 1
        if calls["n"] == 23:  # epoch 2, batch 8: after the checkpoint at step 20
            raise KeyboardInterrupt
        return original(self, model, batch, progress)

    monkeypatch.setattr(FlowTask, "training_step", crash_at_step_23)
    with pytest.raises(KeyboardInterrupt):
        dk_api.train("mlp", data, out=tmp_path / "cut", **kw)
    monkeypatch.setattr(FlowTask, "training_step", original)
    state = safe_load(tmp_path / "cut" / "mlp-s3" / "last.pt")
    assert (state["epoch"], state["batch"]) == (1, 5)
    resumed = dk_api.train("mlp", data, out=tmp_path / "cut", resume=True, **kw)
    ref_w, res_w = reference.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(ref_w[k], res_w[k]) for k in ref_w)
    assert reference.accuracy == resumed.accuracy
    # the per-epoch record, read back across the interruption (epoch 2's loss mean covers the batches after it)
    assert [(r["epoch"], r["test_acc"]) for r in reference.epochs] == [
        (r["epoch"], r["test_acc"]) for r in resumed.epochs
    ]


def test_resume_with_a_different_teacher_is_refused(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    first = dk("train", str(recipe), "--model", "teacher", "--out", "t", "--quiet", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    teacher = tmp_path / "t" / "teacher.pt"
    run = dk("distill", str(recipe), f"teacher.checkpoint={teacher}", "--out", "d", "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    # pretend the student stage was interrupted, then swap the teacher's weights
    data = json.loads((tmp_path / "d" / "results.json").read_text())
    data["models"] = [m for m in data["models"] if m["role"] == "teacher"]
    (tmp_path / "d" / "results.json").write_text(json.dumps(data))
    payload = torch.load(teacher, weights_only=True)
    payload["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    other = tmp_path / "other.pt"
    torch.save(payload, other)
    again = dk("distill", str(recipe), f"teacher.checkpoint={other}", "--out", "d", "--resume", cwd=tmp_path)
    assert again.returncode == 2
    assert "refusing to resume" in again.stderr and "teacher" in again.stderr
