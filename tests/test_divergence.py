"""Divergence caught at the step: the run stops at the step whose loss (or gradient) went
non-finite, names it and its terms, never writes a non-finite checkpoint, and ``--resume``
continues from the last good one (``darkknowledge/engine/divergence.py``)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import darkknowledge.engine.trainer as trainer_module
from darkknowledge.data import BatchLoader, TensorData
from darkknowledge.data.batch import Batch
from darkknowledge.engine.checkpoint import safe_load
from darkknowledge.engine.divergence import DivergenceWatch
from darkknowledge.engine.task import MAIN, Task
from darkknowledge.engine.trainer import Trainer
from darkknowledge.errors import DarkKnowledgeError, DivergenceError
from helpers import dk, write_recipe
from multipart_task import DuelTask, config, make

NAN = float("nan")


class Fragile(Task):
    """A linear classifier whose extra loss term ``boom`` turns NaN from its ``nan_at``-th call on
    (``grad_only``: the term stays 0 but its gradient is NaN)."""

    def __init__(self, seed: int = 0, nan_at: int | None = None, grad_only: bool = False) -> None:
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.nan_at, self.grad_only, self.calls = nan_at, grad_only, 0

    @property
    def module(self) -> nn.Module:
        return self.net

    def training_step(self, model: nn.Module, batch: Batch, epoch_progress: float, part: str = MAIN):
        self.calls += 1
        ce = F.cross_entropy(model(batch.x), batch.y)
        boom = ce.new_zeros(())
        if self.nan_at is not None and self.calls >= self.nan_at:
            w = model[2].weight.sum()
            boom = torch.sqrt(w * 0.0) if self.grad_only else w * NAN  # sqrt'(0) * 0 = NaN: a NaN gradient
        return ce + boom, {"ce": ce.detach(), "boom": boom.detach()}

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self.net}


def _data(scale: float = 1.0) -> TensorData:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g) * scale
    return TensorData(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())


def fit(task: Task, cfg, run_dir=None, resume: bool = False, data: TensorData | None = None):
    data = data if data is not None else _data()
    loader = BatchLoader(data, 16, seed=0)  # 6 batches per epoch
    evals = BatchLoader(data, 96, shuffle=False)
    return Trainer(task, loader, evals, cfg, torch.device("cpu"), run_dir=run_dir, progress=False).fit(resume=resume)


def all_finite(obj) -> bool:
    """Every floating-point tensor anywhere in a checkpoint is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


def same_weights(a: nn.Module, b: nn.Module) -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


def test_a_nan_loss_stops_at_its_step_keeps_the_last_good_checkpoint_and_resume_continues(tmp_path):
    cfg = config(epochs=3, checkpoint_every_steps=4)
    reference = Fragile()
    fit(reference, cfg, run_dir=tmp_path / "ref")
    run = tmp_path / "run"
    task = Fragile(nan_at=11)  # epoch 2, its 5th step; checkpoints at steps 4, 6 (epoch end), 8
    with pytest.raises(DivergenceError) as caught:
        fit(task, cfg, run_dir=run)
    message = str(caught.value)
    assert isinstance(caught.value, FloatingPointError) and isinstance(caught.value, DarkKnowledgeError)
    assert "\n" not in message
    assert "[train] training diverged" in message and "epoch 2, step 11" in message
    assert "boom=nan" in message and "loss=nan" in message and "ce=" not in message  # only the bad terms
    assert "its update was not applied" in message
    assert "--resume" in message and "last.pt, step 8" in message and "train.optimizer.lr, now" in message
    assert all(torch.isfinite(p).all() for p in task.module.parameters())  # step 11's NaN update skipped
    state = safe_load(run / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 8)
    assert all_finite(state) and all_finite(safe_load(run / "best.pt"))

    fixed = Fragile(seed=5)  # other initial weights: everything comes from last.pt
    result = fit(fixed, cfg, run_dir=run, resume=True)
    assert result.steps == 18
    same_weights(reference.module, fixed.module)
    assert all_finite(safe_load(run / "last.pt"))


def test_the_several_parts_loop_names_the_part_and_resumes(tmp_path, monkeypatch):
    cfg = config(epochs=3, checkpoint_every_steps=4)
    reference, data = make()
    fit(reference, cfg, run_dir=tmp_path / "ref", data=data)
    original = DuelTask.training_step
    calls = {"critic": 0}

    def critic_diverges(self, model, batch, progress, part="student"):
        loss, terms = original(self, model, batch, progress, part)
        if part == "critic":
            calls["critic"] += 1
            if calls["critic"] == 5:  # batch 9 (the critic steps on every 2nd batch), in epoch 2
                return loss * NAN, {**terms, "mse": terms["mse"] * NAN}
        return loss, terms

    monkeypatch.setattr(DuelTask, "training_step", critic_diverges)
    task, _ = make()
    with pytest.raises(
        DivergenceError,
        match=r"epoch 2, step 9, part 'critic' \(loss=nan, mse=nan\)"
        r".*last\.pt, step 8",
    ):
        fit(task, cfg, run_dir=tmp_path / "run", data=data)
    assert all(torch.isfinite(p).all() for p in task.module.parameters())
    state = safe_load(tmp_path / "run" / "last.pt")
    assert state["step"] == 8 and all_finite(state)

    monkeypatch.setattr(DuelTask, "training_step", original)
    resumed, _ = make(seed=5)
    assert fit(resumed, cfg, run_dir=tmp_path / "run", resume=True, data=data).steps == 18
    same_weights(reference.module, resumed.module)


def test_a_learning_rate_that_blows_up_never_writes_a_non_finite_checkpoint(tmp_path):
    cfg = config(
        epochs=3, checkpoint_every_steps=1, optimizer={"name": "sgd", "lr": 1e30}, scheduler={"name": "constant"}
    )
    with pytest.raises(DivergenceError) as caught:
        fit(Fragile(), cfg, run_dir=tmp_path)
    message = str(caught.value)
    step = int(re.search(r"step (\d+)", message).group(1))
    saved = safe_load(tmp_path / "last.pt")
    assert saved["step"] == step - 1 and f"last.pt, step {step - 1}" in message
    assert "now 1e+30" in message
    for path in tmp_path.glob("*.pt"):
        assert all_finite(safe_load(path)), path.name


def test_a_non_finite_gradient_under_a_finite_loss_is_caught(tmp_path):
    # without clipping: the NaN update of step 5 shows in step 6's loss, before step 6's update
    with pytest.raises(
        DivergenceError,
        match=r"step 6 .*the weights were non-finite before it "
        r"\(weight '2\.weight'.*an update after step 4 diverged",
    ):
        fit(Fragile(nan_at=5, grad_only=True), config(epochs=2, checkpoint_every_steps=4), run_dir=tmp_path / "a")
    assert all_finite(safe_load(tmp_path / "a" / "last.pt"))
    # with clipping, whose norm the check reads: at the step itself, and its update is not applied
    task = Fragile(nan_at=5, grad_only=True)
    with pytest.raises(DivergenceError, match=r"gradient norm became nan at epoch 1, step 5 \(loss "):
        fit(task, config(epochs=2, clip_grad_norm=1.0))
    assert all(torch.isfinite(p).all() for p in task.module.parameters())


def test_a_batched_check_finds_the_step_and_never_saves_what_followed(tmp_path, monkeypatch):
    """On accelerators the flag stays on the device and is read before each checkpoint."""

    class Batched(DivergenceWatch):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.per_step = False  # as on a GPU

    monkeypatch.setattr(trainer_module, "DivergenceWatch", Batched)
    task = Fragile(nan_at=11)
    with pytest.raises(
        DivergenceError, match=r"epoch 2, step 11 \(loss=nan, boom=nan\); nothing after step 8"
    ) as caught:
        fit(task, config(epochs=3, checkpoint_every_steps=4), run_dir=tmp_path)
    assert "its update was not applied" not in str(caught.value)  # applied, and discarded
    state = safe_load(tmp_path / "last.pt")
    assert state["step"] == 8 and all_finite(state)


def test_steps_a_grad_scaler_skips_are_not_divergence(monkeypatch):
    """fp16's grad scaler skips steps with infinite gradients itself: not reported as divergence."""
    scalers = []

    def huge_scale(device, dtype):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0**127))
        return scalers[-1]

    monkeypatch.setattr("darkknowledge.engine.stepper.make_grad_scaler", huge_scale)
    task = Fragile()
    result = fit(task, config(epochs=2, clip_grad_norm=1.0), data=_data(scale=1e3))  # large losses: the first
    assert result.steps == 12 and scalers[0].get_scale() < 2.0**127  # scaled gradients overflow, skipped
    assert all(torch.isfinite(p).all() for p in task.module.parameters())


@pytest.mark.slow
def test_the_cli_prints_one_line_and_exits_2(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    proc = dk(
        "train",
        str(recipe),
        "data.params.num_samples=600",
        "train.epochs=1",
        "train.optimizer.name=sgd",
        "train.optimizer.lr=1e30",
        "train.checkpoint_every_steps=2",
        "--out",
        "run",
        "--quiet",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dk: error: [") and "training diverged" in lines[0]
    assert "Traceback" not in proc.stderr
    for path in (tmp_path / "run").rglob("*.pt"):
        assert all_finite(safe_load(path)), path


@pytest.mark.slow
def test_resume_with_a_lower_learning_rate_gets_past_the_divergence(tmp_path):
    """The way out the message names: ``--resume train.optimizer.lr=<lower>`` continues from the last
    good ``last.pt`` at the lower rate (a raised rate is refused); the run then finishes, finite.
    At lr 30 the weights blow up in epoch 2 (step 17's loss is inf); the last checkpoint (step 15)
    is from before the updates that did it, so a lower rate from there gets past it."""
    recipe = write_recipe(tmp_path / "r.yaml")
    common = [
        "data.params.num_samples=600",
        "train.epochs=3",
        "train.optimizer.name=sgd",
        "train.scheduler.name=constant",
        "train.checkpoint_every_steps=5",
        "--out",
        "run",
        "--quiet",
    ]
    proc = dk("train", str(recipe), *common, "train.optimizer.lr=30", cwd=tmp_path)  # diverges in epoch 2
    assert proc.returncode == 2 and "training diverged" in proc.stderr, proc.stderr
    stage = next((tmp_path / "run").glob("student-ce-s*"))
    good_step = safe_load(stage / "last.pt")["step"]
    raised = dk("train", str(recipe), *common, "train.optimizer.lr=60", "--resume", cwd=tmp_path)
    assert raised.returncode == 2 and "may be lowered, not raised" in raised.stderr, raised.stderr
    proc = dk("train", str(recipe), *common, "train.optimizer.lr=0.01", "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    final = safe_load(stage / "last.pt")
    assert final["step"] > good_step and all_finite(final)
    assert "lr: 0.01" in (tmp_path / "run" / "config.yaml").read_text()
    logged = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert '"lr": 0.01' in logged[-1]
