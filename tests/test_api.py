"""The Python API: any nn.Module as student/teacher, tensors as data."""

import json

import torch
from torch import nn

import darkknowledge as dk


class Tiny(nn.Module):
    """A user-defined model that is not in the zoo."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, width), nn.ReLU())
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.body(x))


def test_train_then_distill_user_modules(toy_tensors, tmp_path):
    torch.manual_seed(0)
    trained = dk.train(Tiny(64), toy_tensors, epochs=15, lr=0.01, batch_size=32)
    assert isinstance(trained, dk.TrainResult) and trained.teacher is None and trained.run_dir is None
    assert [row["epoch"] for row in trained.epochs] == list(range(1, 16))  # kept without a run folder
    assert trained.epochs[-1]["test_acc"] == trained.accuracy and "ce" in trained.epochs[0]
    teacher = trained.model
    teacher_acc = teacher(toy_tensors[1][0]).argmax(-1).eq(toy_tensors[1][1]).float().mean().item()
    assert teacher_acc > 0.9

    student = Tiny(8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.eval()  # the user's choice of mode: it comes back in it
    out = dk.distill(
        student,
        teacher,
        toy_tensors,
        losses={"kd": {"T": 4.0}},
        epochs=10,
        lr=0.01,
        batch_size=32,
        out=tmp_path / "run",
    )
    assert out.model is student
    assert out.accuracy > 80.0 and out.best_accuracy >= out.accuracy
    assert out.run_dir == tmp_path / "run" and out.results == tmp_path / "run" / "results.json"
    assert str(out).splitlines() == [
        f"{out.entry['name']}: test acc {out.accuracy:.2f} (best {out.best_accuracy:.2f} @ epoch "
        f"{out.entry['best_epoch']}), {out.entry['train_seconds']:.1f}s",
        f"  fidelity: agrees with the teacher on {out.agreement:.2f}% of test samples, "
        f"KL(teacher‖model) {out.kl_to_teacher:.4f}",  # a teacher given as a module is the reference too
        f"run folder: {tmp_path / 'run'}",
    ]
    assert out.agreement > 80.0  # both fit the separable problem: they mostly agree
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/kd"] for r in logged if r["kind"] == "train"] == [row["kd"] for row in out.epochs]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # the teacher stayed frozen
    assert not teacher.training and all(p.requires_grad for p in teacher.parameters())  # as it came
    assert (tmp_path / "run" / "results.json").is_file() and (tmp_path / "run" / "metrics.jsonl").is_file()


def test_distill_by_names_trains_the_teacher_first(tmp_path):
    out = dk.distill(
        "mlp",
        "cnn2d",
        "digits",
        losses={"ce": {"weight": 0.5}, "kd": {"alpha": 1.0, "weight": 0.5}},
        epochs=2,
        batch_size=64,
        config={"teacher": {"train": {"epochs": 2}}},
    )
    assert out.teacher["role"] == "teacher" and out.teacher["model"] == "cnn2d"
    assert out.teacher_accuracy == out.teacher["last_acc"] and "; teacher " in str(out)
    assert out.entry["losses"] == ["ce", "kd"]
    assert out.spec["name"] == "mlp" and out.spec["params"]["input_shape"] == [1, 8, 8]


def test_named_models_take_their_params_from_config(toy_tensors):
    """config={"student": {"params": ...}} shapes the student built by name (it was once dropped)."""
    student = {"student": {"params": {"hidden": [7]}}}
    out = dk.distill("mlp", Tiny(16), toy_tensors, epochs=1, config=student)
    widths = [m.out_features for m in out.model.modules() if isinstance(m, nn.Linear)]
    assert widths == [7, 4] and out.spec["params"]["hidden"] == [7]
    alone = dk.train("mlp", toy_tensors, epochs=1, config=student)
    assert [m.out_features for m in alone.model.modules() if isinstance(m, nn.Linear)] == [7, 4]


def test_resume_extends_a_run_whose_teacher_was_given_as_a_module(toy_tensors, tmp_path):
    """A module teacher is not trained in the run, so more student epochs do not change it."""
    teacher = dk.train(Tiny(16), toy_tensors, epochs=2).model
    first = dk.distill(Tiny(8), teacher, toy_tensors, epochs=1, out=tmp_path / "run")
    more = dk.distill(Tiny(8), teacher, toy_tensors, epochs=2, out=tmp_path / "run", resume=True)
    assert [row["epoch"] for row in first.epochs] == [1]
    assert [row["epoch"] for row in more.epochs] == [1, 2]
