"""`pipeline`: explicit stages, validated up front, each taught by an earlier one, resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from darkknowledge.config import deep_merge, load_config
from darkknowledge.data import DatasetInfo
from darkknowledge.engine.checkpoint import safe_load, state_hash
from darkknowledge.engine.task import Task
from darkknowledge.errors import ConfigError
from darkknowledge.models import create_model
from darkknowledge.runs.context import RunContext
from darkknowledge.schemes import resolve_scheme
from darkknowledge.schemes.pipeline import Pipeline
from helpers import TINY, dk, results, write_recipe

KD = {"kd": {"T": 4.0, "alpha": 0.9}}
STAGES = [
    {"name": "big", "model": {"name": "mlp", "params": {"hidden": [64, 64]}}},
    {"name": "mid", "model": {"name": "mlp", "params": {"hidden": [32]}}, "teacher": "big", "losses": KD},
    {"name": "last", "teacher": "mid", "losses": KD},
]


def _stages(stages):
    """``scheme.params`` of a pipeline with these stages, validated as a recipe's are."""
    return resolve_scheme("pipeline", {"stages": stages})[1]


class StubContext(RunContext):
    """A run context without data: ``train`` records who taught whom (each stage's task, built
    when its stage starts) and nudges the trained weights."""

    def __init__(self, has_teacher=False):
        raw = deep_merge(
            TINY, {"student": {"name": "mlp", "params": {"hidden": [8]}}, "losses": KD, "scheme": {"name": "pipeline"}}
        )
        if not has_teacher:
            del raw["teacher"]
        cfg = load_config(raw)
        session = SimpleNamespace(cfg=cfg, bundle=SimpleNamespace(info=DatasetInfo("mnist1d", 10, (40,))))
        super().__init__(session, cfg)  # type: ignore[arg-type]
        self.trained: list[dict] = []
        self._teacher = create_model("mlp", hidden=[16])

    def teacher(self):
        return self._teacher

    def train(self, stage, task: Task, seed, role="student", train_cfg=None, with_transfer=False, label=None):
        model = task.eval_models()["student"]
        teacher = task.teachers[0] if task.teachers else None
        self.trained.append(
            {
                "stage": stage,
                "role": role,
                "model": model,
                "train_cfg": train_cfg,
                "teacher": teacher.model if teacher is not None else None,
                "teacher_hash": task.fingerprint(),
                "transfer": with_transfer,
                "losses": list(task.flow.objective.terms),
            }
        )
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        self.exports[stage] = task.export_model()
        return [{"name": stage, "role": role}]


def test_stages_teach_in_order_and_the_last_is_the_student():
    ctx = StubContext()
    stages = _stages([*STAGES[:2], {**STAGES[2], "train": {"epochs": 2}}])
    entries = Pipeline.run(ctx, 0, stages)
    big, mid, last = ctx.trained
    assert [t["stage"] for t in ctx.trained] == ["pipeline-big-s0", "pipeline-mid-s0", "pipeline-s0"]
    assert [t["role"] for t in ctx.trained] == ["big", "mid", "student"]
    assert entries[0]["name"] == "pipeline-s0"  # the primary leads
    assert big["teacher"] is None and big["teacher_hash"] is None and big["losses"] == ["ce"] and not big["transfer"]
    assert mid["teacher"] is big["model"] and last["teacher"] is mid["model"] and last["transfer"]
    assert last["teacher_hash"] == state_hash(mid["model"])  # the trained weights teach
    assert last["train_cfg"].epochs == 2 != ctx.cfg.train.epochs and big["train_cfg"] is None
    assert last["train_cfg"].optimizer == ctx.cfg.train.optimizer  # the stage's train merged over the recipe's


def test_recipe_teacher_can_teach_a_stage():
    ctx = StubContext(has_teacher=True)
    Pipeline.run(ctx, 1, _stages([{"name": "only", "teacher": "teacher", "losses": KD}]))
    assert ctx.trained[0]["teacher"] is ctx.teacher() and ctx.trained[0]["role"] == "student"


@pytest.mark.parametrize(
    "stages,match",
    [
        ([STAGES[0], STAGES[0]], r"stages.1.name: duplicate stage name 'big'"),
        ([STAGES[0], {**STAGES[1], "teacher": "bgi"}], r"stages.1.teacher: unknown teacher 'bgi'; valid: 'big'"),
        (
            [{**STAGES[1], "teacher": "last"}, STAGES[2]],
            r"stages.0.teacher: unknown teacher 'last' \(a stage can only be taught by an earlier one\)",
        ),
        (
            [{"name": "x", "teacher": "teacher", "losses": KD}],
            r"unknown teacher 'teacher' \(the recipe has no `teacher:` section\)",
        ),
        ([], r"at least one stage"),
    ],
)
def test_bad_stage_references_are_clear_errors_before_training(stages, match):
    ctx = StubContext()
    with pytest.raises(ConfigError, match=match):
        Pipeline.run(ctx, 0, _stages(stages))
    assert ctx.trained == []


def test_losses_needing_a_teacher_on_a_stage_without_one_fail_before_training():
    ctx = StubContext()
    with pytest.raises(ConfigError, match=r"stages.1.losses: losses \['kd'\] need a teacher"):
        Pipeline.run(ctx, 0, _stages([STAGES[0], {"name": "x", "losses": KD}]))
    assert ctx.trained == []


@pytest.mark.parametrize(
    "stage,match",
    [
        ({"name": "student"}, "not one of teacher, student, baseline"),
        ({"name": "a-b"}, "letters, digits"),
        ({"name": "a", "modle": "student"}, "modle"),
    ],
)
def test_stage_fields_are_validated(stage, match):
    with pytest.raises(ConfigError, match=match):
        _stages([stage])


def _wait_for_train_epoch(metrics, stage, epoch, proc, limit=300.0):
    import json
    import time

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


@pytest.mark.slow
def test_killed_pipeline_resumes_at_the_stage_and_epoch_where_it_stopped(tmp_path):
    stages = [
        {"name": "big", "model": {"name": "cnn1d", "params": {"channels": 8}}, "train": {"epochs": 2}},
        {"name": "mid", "model": {"name": "mlp", "params": {"hidden": [48]}}, "teacher": "big", "losses": KD},
        {"name": "last", "teacher": "mid", "losses": KD, "train": {"epochs": 2}},
    ]
    recipe = write_recipe(
        tmp_path / "r.yaml", seeds=[0], train={"epochs": 5}, scheme={"name": "pipeline", "params": {"stages": stages}}
    )
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
    _wait_for_train_epoch(tmp_path / "cut" / "metrics.jsonl", "pipeline-mid-s0", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut = results(tmp_path / "cut")
    assert "pipeline-big-s0" in cut and "pipeline-mid-s0" not in cut, "killed at the wrong moment"
    assert 1 <= safe_load(tmp_path / "cut" / "pipeline-mid-s0" / "last.pt")["epoch"] < 5

    resumed = dk("distill", str(recipe), "--out", "cut", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    log = resumed.stdout + resumed.stderr
    assert "[pipeline-big-s0] finished earlier" in log and "[pipeline-mid-s0] resumed from epoch" in log
    a, b = results(tmp_path / "full"), results(tmp_path / "cut")
    for name in ("pipeline-big-s0", "pipeline-mid-s0", "pipeline-s0"):
        assert a[name]["last_acc"] == b[name]["last_acc"] and a[name]["steps"] == b[name]["steps"], name
    assert b["pipeline-s0"]["role"] == "student" and b["pipeline-mid-s0"]["role"] == "mid"
