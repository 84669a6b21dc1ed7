"""Two CPU processes (gloo DDP) give the same student as one process with the same global batch.

Tolerance: the ranks average gradients of two half-batches where one process takes the mean
of the whole batch, so results differ only by float rounding: measured 5e-8 on the weights
after 3 epochs (bit-identical from run to run), checked to 1e-4; test accuracy to one of the
200 test samples (0.5 points). Both runs use one thread per process (``helpers.ONE_THREAD``),
so the kernels are the same and the only difference is the one under test.
"""

import pytest
import torch

from darkknowledge.commands import evaluate_checkpoint
from darkknowledge.engine.checkpoint import load_exported
from helpers import ONE_THREAD, dk, results, torchrun, write_recipe

pytestmark = pytest.mark.slow


def distill_single_and_ddp(tmp_path, recipe):
    """Train the recipe's teacher once, then distil with one process and with two (gloo DDP);
    returns the two-process run's stdout."""
    made = dk("train", str(recipe), "--model", "teacher", "--out", "t", "--quiet", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    teacher = f"teacher.checkpoint={tmp_path / 't' / 'teacher.pt'}"
    single = dk("distill", str(recipe), teacher, "--out", "single", "--quiet", cwd=tmp_path, env=ONE_THREAD)
    assert single.returncode == 0, single.stderr
    ddp = torchrun("distill", str(recipe), teacher, "--out", "ddp", "--quiet", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    return ddp.stdout


def test_two_process_ddp_matches_single_process(tmp_path):
    out = distill_single_and_ddp(tmp_path, write_recipe(tmp_path / "r.yaml"))
    assert out.count("run folder:") == 1  # only rank 0 reports (and writes)

    a, b = results(tmp_path / "single")["kd-s0"], results(tmp_path / "ddp")["kd-s0"]
    assert a["steps"] == b["steps"]
    # the weights are compared below; accuracies are not compared across the two runs: one test
    # sample near a tie may flip between float summation orders (0.5 points here), which made the
    # DDP tests flaky. DDP's evaluation is checked on its own weights instead.
    assert evaluate_checkpoint(tmp_path / "ddp" / "student.pt")["top1"] == pytest.approx(b["last_acc"], abs=0.01)
    _, wa = load_exported(tmp_path / "single" / "student.pt")
    _, wb = load_exported(tmp_path / "ddp" / "student.pt")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4), k
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ddp").rglob("*"))


def test_two_process_ddp_cross_modal_matches_single_process(tmp_path):
    """Paired views under DDP: each rank's share carries the student's derived view (the signal
    at half length) and the teacher's stored one; two ranks give one process's student."""
    views = {
        "data": {"views": {"half": {"source": "signal", "transform": "downsample", "params": {"size": 20}}}},
        "student": {"name": "mlp", "params": {"hidden": [32]}, "input": "half"},
        "teacher": {"input": "signal"},
        "seeds": [0],
    }
    distill_single_and_ddp(tmp_path, write_recipe(tmp_path / "r.yaml", **views))
    spec, wa = load_exported(tmp_path / "single" / "student.pt")
    _, wb = load_exported(tmp_path / "ddp" / "student.pt")
    assert spec["input"] == "half" and spec["params"]["input_shape"] == [20]  # the student read its own view
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4), k
    out = evaluate_checkpoint(tmp_path / "ddp" / "student.pt")
    assert out["top1"] == pytest.approx(results(tmp_path / "ddp")["kd-s0"]["last_acc"], abs=0.01)
