"""Several optimizers in one step: parts with their own optimizer, LR schedule and step ratio,
checkpointed and resumed together, and the same under 2-process DDP (``tests/multipart_task.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from darkknowledge.data import BatchLoader
from darkknowledge.engine.checkpoint import safe_load
from darkknowledge.engine.metrics import MetricsLog
from darkknowledge.engine.trainer import Trainer
from darkknowledge.errors import ConfigError
from multipart_task import config, make

HERE = Path(__file__).resolve().parent


def fit(task, data, cfg, run_dir=None, resume=False, metrics=None):
    loader = BatchLoader(data, 16, seed=0)
    evals = BatchLoader(data, 96, shuffle=False)
    return Trainer(task, loader, evals, cfg, torch.device("cpu"), run_dir=run_dir, progress=False, metrics=metrics).fit(
        resume=resume
    )


def test_each_part_steps_at_its_ratio_with_its_own_optimizer_and_schedule(tmp_path):
    task, data = make()
    metrics = tmp_path / "metrics.jsonl"
    result = fit(task, data, config(), run_dir=tmp_path / "run", metrics=MetricsLog(metrics))
    assert result.steps == 12  # batches: 2 epochs of 96 / 16
    assert task.steps == {"critic": 6, "student": 12}  # every 2nd batch, every batch
    state = safe_load(tmp_path / "run" / "last.pt")
    critic_opt, student_opt = state["parts"]["critic"]["optimizer"], state["parts"]["student"]["optimizer"]
    assert "momentum_buffer" not in str(critic_opt) and student_opt["state"][0]["step"] == 12  # SGD vs AdamW
    assert state["parts"]["critic"]["scheduler"]["last_epoch"] == 6
    train = [line for line in metrics.read_text().splitlines() if '"kind": "train"' in line]
    assert '"lr/critic": 0.1' in train[-1]  # constant
    assert '"lr/student": 0.01' not in train[-1]  # cosine: decayed
    assert '"train/critic/mse"' in train[-1] and '"train/student/ce"' in train[-1]


def test_the_same_update_as_a_hand_written_loop():
    task, data = make()
    fit(
        task,
        data,
        config(epochs=1, optimizer={"name": "adamw", "lr": 0.01, "fused": False}, scheduler={"name": "constant"}),
    )
    ref, _ = make()
    duel = ref.module
    critic_opt = torch.optim.SGD(duel.critic.parameters(), lr=0.1, momentum=0.0)
    student_opt = torch.optim.AdamW(duel.student.parameters(), lr=0.01, weight_decay=0.0)  # the config default
    loader = BatchLoader(data, 16, seed=0)
    loader.set_epoch(0)
    for b, batch in enumerate(loader):
        for name, opt in (("critic", critic_opt), ("student", student_opt)):
            if name == "critic" and b % 2:
                continue
            duel.zero_grad(set_to_none=True)  # the student's loss also reached the critic: dropped
            loss, _ = duel(batch, b / len(loader), name)
            loss.backward()
            opt.step()
    for (k, a), b in zip(task.module.state_dict().items(), duel.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_interrupted_and_resumed_gives_the_same_weights(tmp_path, monkeypatch):
    cfg = config(epochs=3, checkpoint_every_steps=4)
    reference, data = make()
    fit(reference, data, cfg, run_dir=tmp_path / "ref")
    cut, _ = make()
    calls = {"n": 0}
    original = type(cut).training_step

    def stop_midway(self, model, batch, progress, part="student"):
        calls["n"] += 1
        if calls["n"] == 20:  # batch 14 (critic + student steps so far: 19): after the checkpoint at batch 12
            raise KeyboardInterrupt
        return original(self, model, batch, progress, part)

    monkeypatch.setattr(type(cut), "training_step", stop_midway)
    with pytest.raises(KeyboardInterrupt):
        fit(cut, data, cfg, run_dir=tmp_path / "cut")
    monkeypatch.setattr(type(cut), "training_step", original)
    state = safe_load(tmp_path / "cut" / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (2, 0, 12)
    resumed, _ = make(seed=5)  # other initial weights: everything must come from the checkpoint
    fit(resumed, data, cfg, run_dir=tmp_path / "cut", resume=True)
    for (k, a), b in zip(reference.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), k
    ref_state, cut_state = safe_load(tmp_path / "ref" / "last.pt"), safe_load(tmp_path / "cut" / "last.pt")
    assert (
        ref_state["parts"]["critic"]["optimizer"]["state"].keys()
        == cut_state["parts"]["critic"]["optimizer"]["state"].keys()
    )
    assert torch.equal(
        ref_state["parts"]["student"]["optimizer"]["state"][0]["exp_avg"],
        cut_state["parts"]["student"]["optimizer"]["state"][0]["exp_avg"],
    )


def test_gradient_accumulation_with_several_parts_is_refused():
    task, data = make()
    with pytest.raises(ConfigError, match="grad_accum=2.*critic, student"):
        fit(task, data, config(grad_accum=2))


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, str(HERE / "multipart_task.py"), str(tmp_path / "one.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--local-addr=127.0.0.1",
            str(HERE / "multipart_task.py"),
            str(tmp_path / "two.pt"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
