"""Engine fast paths: the teacher is skipped when its outputs are cached, channels_last, per-epoch
timings, and the speed benchmark's output (its figures are not asserted: timing is for benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from darkknowledge.config import CacheConfig, TrainConfig
from darkknowledge.data import BatchLoader, TensorData
from darkknowledge.engine.trainer import Trainer
from darkknowledge.models import create_model
from darkknowledge.runs.build import build_objective
from darkknowledge.schemes.offline import offline_task
from darkknowledge.schemes.task import FlowTask

ROOT = Path(__file__).resolve().parents[1]


def _data(n: int, shape: tuple[int, ...]) -> TensorData:
    g = torch.Generator().manual_seed(0)
    return TensorData(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))


def _fit(scheme: FlowTask, data: TensorData, epochs: int = 2, **train) -> tuple[Trainer, object]:
    cfg = TrainConfig(epochs=epochs, device="cpu", deterministic=True, optimizer={"name": "sgd", "lr": 0.05}, **train)
    trainer = Trainer(
        scheme,
        BatchLoader(data, 32, seed=0),
        BatchLoader(data, 64, shuffle=False),
        cfg,
        torch.device("cpu"),
        progress=False,
    )
    return trainer, trainer.fit()


def _model(name: str, seed: int, shape: tuple[int, ...], **params) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, input_shape=shape, **params)


def test_the_teacher_never_runs_in_training_when_its_outputs_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DK_CACHE", str(tmp_path))
    data = _data(128, (40,))
    calls = {}
    for mode, cache in (
        ("live", CacheConfig(live_batches=1)),
        ("ahead", CacheConfig()),
        ("cached", CacheConfig(enabled=True)),
    ):
        teacher = _model("cnn1d", 0, (40,), channels=8)
        count = [0]
        teacher.register_forward_hook(lambda *a, c=count: c.__setitem__(0, c[0] + 1))
        scheme = offline_task(_model("mlp", 1, (40,), hidden=[16]), build_objective({"kd": {}}), teacher, cache=cache)
        _, result = _fit(scheme, data)
        calls[mode] = count[0]
        assert len(result.epoch_seconds) == 2 and all(t > 0 for t in result.epoch_seconds)
    steps = 2 * 4  # 2 epochs of 128 / 32 batches
    assert calls["live"] == steps + 1  # every step, plus the setup dry run
    assert calls["ahead"] == 2 + 1  # on CPU the live teacher runs on 4 batches at once: once per epoch here
    assert calls["cached"] == 4  # the cache build's one pass (4 batches); the dry run reads the cache too


def test_a_teacher_run_ahead_gives_every_batch_its_own_outputs():
    """Running the teacher on several batches at once changes nothing: the student trains to
    the same weights as with one teacher call per batch, also with a partial last group."""
    data = _data(160, (40,))  # 5 batches of 32: groups of 2 leave one batch alone
    weights = {}
    for n in (1, 2, 3):
        teacher = _model("cnn1d", 0, (40,), channels=8)
        scheme = offline_task(
            _model("cnn1d", 1, (40,), channels=4),
            build_objective({"kd": {}, "fitnet": {}}),
            teacher,
            cache=CacheConfig(live_batches=n),
        )
        _fit(scheme, data)
        assert (scheme.teachers[0].ahead is None) == (n == 1)
        weights[n] = scheme.module.student.state_dict()
    for n in (2, 3):
        for k, v in weights[1].items():
            torch.testing.assert_close(weights[n][k], v, rtol=1e-5, atol=1e-6)


def test_teacher_ahead_falls_back_when_outputs_are_not_batch_first():
    from darkknowledge.data.batch import Batch
    from darkknowledge.losses.base import Outputs
    from darkknowledge.teachers.lookahead import TeacherAhead

    calls = []

    def sequence_first(x):  # features (L, B, C), like a batch_first=False RNN
        calls.append(len(x))
        return Outputs(logits=x[:, :3], features={"h": x.T[:, :, None]})

    batches = [Batch(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), torch.arange(4)) for _ in range(3)]
    ahead = TeacherAhead(sequence_first, 3)
    for b in ahead.wrap(batches):
        out = ahead.take(b)
        assert torch.equal(out.features["h"], b.x.T[:, :, None]) and torch.equal(out.logits, b.x[:, :3])
    assert calls == [12, 4, 4, 4]  # one joint try, then batch by batch
    assert ahead.take(batches[0]) is None  # handed out once


def test_channels_last_trains_the_same_model(tmp_path):
    data = _data(64, (3, 8, 8))
    weights = []
    for channels_last in (False, True):
        scheme = offline_task(
            _model("cnn2d", 1, (3, 8, 8)), build_objective({"kd": {}, "at": {}}), _model("cnn2d", 0, (3, 8, 8))
        )
        _fit(scheme, data, epochs=1, channels_last=channels_last)
        weights.append(scheme.export_model().state_dict())
    for k in weights[0]:
        assert torch.allclose(weights[0][k], weights[1][k], atol=1e-4), k


@pytest.mark.slow
def test_speed_benchmark_prints_the_ratios(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "speed.py"),
            "--quick",
            "--settings",
            "b",
            "d",
            "--reps",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "DK_CACHE": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    b, d = rows
    for key in ("dk_plain/hand_plain", "dk_kd_live/(hand_plain + teacher_fwd)", "dk_kd_cached/hand_plain"):
        assert b[key] > 0
    assert b["cache_build_s"] > 0 and b["cache_mb"] > 0 and b["peak_rss_mb"] > 0
    assert d["samples"][1] == 10 * d["samples"][0]
    assert d["cache_mapped"] == [False, True]  # the 10x cache is beyond the limit: read from disk
    assert "dk_kd_cached/hand_plain" in proc.stdout and "machine:" in proc.stdout


@pytest.mark.slow
def test_the_cache_is_built_once_and_shared_under_ddp(tmp_path):
    from darkknowledge.engine.checkpoint import load_exported
    from helpers import ONE_THREAD, dk, results, torchrun, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", cache=True, seeds=[0])
    env = {"DK_CACHE": str(tmp_path / "cache")}
    made = dk("train", str(recipe), "--model", "teacher", "--out", "t", "--quiet", cwd=tmp_path, env=env)
    assert made.returncode == 0, made.stderr
    teacher = f"teacher.checkpoint={tmp_path / 't' / 'teacher.pt'}"
    single = dk("distill", str(recipe), teacher, "--out", "single", "--quiet", cwd=tmp_path, env={**env, **ONE_THREAD})
    assert single.returncode == 0, single.stderr
    ddp = torchrun("distill", str(recipe), teacher, "--out", "ddp", "--quiet", cwd=tmp_path, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = results(tmp_path / "single")["kd-s0"], results(tmp_path / "ddp")["kd-s0"]
    assert a["teacher_cache"]["path"] == b["teacher_cache"]["path"]  # the same teacher on the same data: one cache
    assert b["teacher_cache"]["reused"]
    assert len(list((tmp_path / "cache" / "teacher_outputs").iterdir())) == 1
    _, wa = load_exported(tmp_path / "single" / "student.pt")
    _, wb = load_exported(tmp_path / "ddp" / "student.pt")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4), k
