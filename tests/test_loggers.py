"""Metrics to TensorBoard and MLflow (the ``log`` section, ``--log``), and the per-epoch lines
off a terminal with the whole run's ETA (engine/eta.py)."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest

import darkknowledge as dkn
from darkknowledge import cli, commands
from darkknowledge.config import LogConfig, RunConfig, load_config
from darkknowledge.engine import eta, loggers, progress
from darkknowledge.engine.eta import PlannedStage, RunClock, for_seeds, format_duration
from darkknowledge.engine.loggers import Loggers, check_loggers, scalars
from darkknowledge.errors import ConfigError
from helpers import TINY, dk, write_recipe

ETA_LINE = re.compile(
    r"^\[(?P<stage>[^\]]+)\] epoch (?P<epoch>\d+)/(?P<epochs>\d+) .* (?P<scope>run|stage) eta "
    r"(?P<eta>\S+)$"
)


def _seconds(text: str) -> int:
    """``1h02m`` / ``3m05s`` / ``45s`` -> seconds."""
    parts = {unit: int(n) for n, unit in re.findall(r"(\d+)([hms])", text)}
    return parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow(run: Path) -> tuple[Any, Any]:
    """The MLflow client of the run folder's store and the run (from ``loggers.json``)."""
    from mlflow.tracking import MlflowClient

    state = json.loads((run / "loggers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=state["uri"])
    return client, client.get_run(state["run_id"])


def _expected(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """What each logger must hold, read off metrics.jsonl's raw fields: every loss term, the
    learning rate and each evaluated model's test top-1 and loss, at step = epoch."""
    want: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        stage, epoch = r["stage"], r["epoch"]
        if r["kind"] == "train":
            want.setdefault(f"{stage}/lr", []).append((epoch, r["lr"]))
            for key, value in r.items():
                if key.startswith("train/"):
                    want.setdefault(f"{stage}/{key}", []).append((epoch, value))
        else:
            for model, m in r["test"].items():
                want.setdefault(f"{stage}/test/{model}/top1", []).append((epoch, m["top1"]))
                want.setdefault(f"{stage}/test/{model}/loss", []).append((epoch, m["loss"]))
    return want


@pytest.fixture()
def no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


# ------------------------------------------------------------------ records, plan, ETA (no training)


def test_a_record_becomes_scalars_under_its_stage_at_its_epoch() -> None:
    train = {
        "kind": "train",
        "stage": "kd-s0",
        "epoch": 3,
        "step": 48,
        "lr": 0.005,
        "lr/critic": 0.001,
        "train/kd": 0.25,
        "train/loss": 0.5,
    }
    assert scalars(train) == (
        3,
        {"kd-s0/lr": 0.005, "kd-s0/lr/critic": 0.001, "kd-s0/train/kd": 0.25, "kd-s0/train/loss": 0.5},
    )
    ev = {
        "kind": "eval",
        "stage": "kd-s0",
        "epoch": 3,
        "step": 48,
        "test": {"student": {"top1": 71.5, "loss": 0.9, "n": 200}},
        "val": {"student": {"top1": 70.0, "loss": 1.0, "n": 80}},
    }
    assert scalars(ev) == (
        3,
        {
            "kd-s0/test/student/top1": 71.5,
            "kd-s0/test/student/loss": 0.9,
            "kd-s0/val/student/top1": 70.0,
            "kd-s0/val/student/loss": 1.0,
        },
    )


def test_the_plan_repeats_per_seed_stages_and_the_eta_follows_the_measured_pace() -> None:
    played = [
        PlannedStage.of("baseline-s0", 0, 2, 10),
        PlannedStage.of("teacher", 0, 3, 10),
        PlannedStage.of("kd-s0", 0, 2, 30),
    ]
    plan = for_seeds(played, [0, 1])
    assert [(p.family, p.seed) for p in plan] == [
        ("baseline", 0),
        ("teacher", 0),
        ("kd", 0),
        ("baseline", 1),
        ("kd", 1),
    ]
    ticks = iter(range(100))
    clock = RunClock(now=lambda: float(next(ticks)))
    clock.plan(plan)
    stage = clock.begin("baseline-s0", 0)
    stage.start(2, 0, 10)
    # 1 s per epoch of 10 batches: the 1 epoch left, then teacher 3 x 10, kd 2 x 30 (x2 seeds), baseline 2 x 10
    assert stage.epoch_done() == pytest.approx(1 + 3 + 6 + 2 + 6)
    clock.skip("teacher", 0)  # a cached teacher: it will not train
    assert stage.epoch_done() == pytest.approx(6 + 2 + 6)
    kd = clock.begin("kd-s0", 0)
    kd.start(2, 0, 30)
    clock.now()  # 2 s for this epoch: kd's own pace from now on
    assert kd.epoch_done() == pytest.approx(2 + 2 + 4)  # its last epoch, baseline-s1 at 1 s, kd-s1 at 2 s
    assert clock.whole and [p.family for p in clock.planned] == ["baseline", "kd"]
    last = clock.begin("kd-s1", 1)  # baseline-s1 was planned before it and did not train: dropped
    last.start(1, 0, 30)
    assert last.epoch_done() == 0.0 and clock.planned == []


def test_a_wildcard_family_stands_for_a_stage_named_later_and_no_plan_means_this_stage() -> None:
    clock = RunClock(now=lambda: 0.0)
    clock.plan([PlannedStage("*@topk", 0, 2), PlannedStage("*@topk", 1, 2)])
    clock.begin("fkl@topk-s0", 0)
    assert [(p.family, p.seed) for p in clock.planned] == [("*@topk", 1)]
    alone = RunClock().begin("x", None)
    assert not alone.whole


def test_durations_read_as_people_write_them() -> None:
    assert [format_duration(s) for s in (0, 0.4, 45, 185, 7440)] == ["0s", "0s", "45s", "3m05s", "2h04m"]


def test_progress_off_a_terminal_logs_one_info_line_and_on_a_terminal_writes_above_the_bar(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="darkknowledge")
    monkeypatch.setattr(progress, "is_terminal", lambda: False)
    progress.Progress(True, "kd-s0").epoch_done(2, 10, {"loss": 0.5}, 65.0, True)
    progress.Progress(True, "kd-s0").epoch_done(2, 10, {}, 5.0, False)
    progress.Progress(False, "kd-s0").epoch_done(2, 10, {}, 5.0, False)  # --quiet: only at DEBUG
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "[kd-s0] epoch 3/10 loss=0.5 run eta 1m05s"),
        (logging.INFO, "[kd-s0] epoch 3/10 stage eta 5s"),
    ]
    monkeypatch.setattr(progress, "is_terminal", lambda: True)
    written = []
    monkeypatch.setattr(progress.tqdm, "write", lambda msg, file=None: written.append(msg))
    shown = progress.Progress(True, "kd-s0")
    assert shown.enabled and not shown.lines
    shown.epoch_done(0, 2, {"acc": 50.0}, 3.0, True)
    assert written == ["[kd-s0] epoch 1/2 acc=50 run eta 3s"] and len(caplog.records) == 2


# ------------------------------------------------------------------ bad input


def test_an_unknown_logger_is_one_clear_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["run", "--log", "tensorboard,wandb"])
    assert stop.value.code == 2
    assert "--log: unknown logger 'wandb'; valid: tensorboard, mlflow" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"log\.wandb: unknown key"):
        load_config(TINY, ["log.wandb=true"])
    with pytest.raises(ConfigError, match=r"log\.mlflow: .*expected true, false, or a folder"):
        load_config(TINY, ["log.mlflow=3"])


def test_log_switches_loggers_on_and_keeps_a_named_store() -> None:
    args, _ = cli._parser().parse_known_args(["run", "--log", "tensorboard,mlflow", "--log", "tensorboard"])
    cfg = load_config(TINY, ["log.mlflow=sqlite:///elsewhere.db"])
    cli._switch_on_loggers(cfg, args.log)
    assert cfg.log.tensorboard is True and cfg.log.mlflow == "sqlite:///elsewhere.db"


@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_a_missing_package_names_the_extra_before_the_run_folder_is_written(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_tracking_env: None
) -> None:
    monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails as if it were not installed
    with pytest.raises(ConfigError, match=rf'log\.{name}: .*pip install "darkknowledge\[{name}\]"'):
        check_loggers(LogConfig(**{name: True}), tmp_path)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"darkknowledge\[{name}\]"):
        commands.distill(load_config(TINY, [f"log.{name}=true"]), out=out, progress=False)
    assert not out.exists()


def test_a_logger_that_needs_the_run_folder_in_a_run_without_one_says_how_to_give_it(
    no_tracking_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loggers, "_import", lambda name: True)  # as if both extras were installed
    with pytest.raises(ConfigError, match=r"log\.tensorboard=true .* has none; give one \(--out DIR, out= "):
        dkn.train("mlp", "mnist1d", epochs=1, config={"log": {"tensorboard": True}})
    with pytest.raises(ConfigError, match=r"log\.mlflow=true .*MLFLOW_TRACKING_URI"):
        check_loggers(LogConfig(mlflow=True), None)
    check_loggers(LogConfig(mlflow="sqlite:///somewhere.db", tensorboard="tb"), None)  # places given: fine


def test_a_logger_that_fails_mid_run_is_dropped_with_a_warning_and_the_others_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Sink:
        def __init__(self, name: str, fail: bool) -> None:
            self.name, self.fail, self.got = name, fail, []

        def write(self, step: int, values: dict[str, float]) -> None:
            if self.fail:
                raise ConnectionError("server gone")
            self.got.append((step, values))

        def close(self, status: str) -> None:
            self.got.append(status)

    bad, good = Sink("mlflow", True), Sink("tensorboard", False)
    both = Loggers([(bad, 0), (good, 0)], tmp_path / "loggers.json")
    both.write({"kind": "train", "stage": "a", "epoch": 1, "train/loss": 2.0})
    both.write({"kind": "train", "stage": "a", "epoch": 2, "train/loss": float("nan")})
    assert "log.mlflow: stopped sending metrics (ConnectionError: server gone)" in caplog.text
    assert good.got == [(1, {"a/train/loss": 2.0}), (2, {})]  # a NaN is left out (MLflow refuses some)
    state = json.loads((tmp_path / "loggers.json").read_text())
    assert state == {"mlflow": {"sent": 0}, "tensorboard": {"sent": 2}}  # a resume sends mlflow everything
    both.failed()
    both.close()
    assert good.got[-1] == "FAILED" and bad.got == ["FAILED"]  # each closed, the failed one too


# ------------------------------------------------------------------ a real run, read back


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def run_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``DK_CACHE`` of this module's runs: its own, so the first run always trains its teacher."""
    return tmp_path_factory.mktemp("dk-cache")


def _off_a_terminal(cfg: RunConfig, out: Path, cache: Path) -> list[str]:
    """``dk run`` of ``cfg`` into ``out``, off a terminal, every epoch 1 s long: its log lines."""
    lines = _Lines()
    ours = logging.getLogger("darkknowledge")
    before = ours.level
    ticks = iter(range(10_000))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("DK_CACHE", str(cache))
        mp.setattr(eta, "_now", lambda: float(next(ticks)))
        mp.setattr(progress, "is_terminal", lambda: False)
        ours.addHandler(lines)
        ours.setLevel(logging.INFO)
        try:
            commands.compare(cfg, out=out, progress=True)
        finally:
            ours.removeHandler(lines)
            ours.setLevel(before)
    return lines.messages


@pytest.fixture(scope="module")
def logged_run(
    tmp_path_factory: pytest.TempPathFactory, run_cache: Path
) -> tuple[Path, list[str], list[dict[str, Any]]]:
    """``dk run`` of TINY (2 seeds, 2 epochs) with both loggers, off a terminal, every epoch 1 s long:
    its folder, its log lines and its results entries (before any test resumes it)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    out = tmp_path_factory.mktemp("loggers") / "run"
    cfg = load_config(TINY, ["train.epochs=2", "log.tensorboard=true", "log.mlflow=true"])
    messages = _off_a_terminal(cfg, out, run_cache)
    return out, messages, json.loads((out / "results.json").read_text())["models"]


@pytest.mark.slow
def test_tensorboard_and_mlflow_hold_every_record_of_metrics_jsonl(logged_run: tuple[Path, Any, Any]) -> None:
    logged_run = logged_run[0]
    want = _expected(_records(logged_run))
    assert {"kd-s0/train/kd", "baseline-s0/train/ce", "kd-s0/test/student/top1"} <= set(want)
    board = _tensorboard(logged_run / "tensorboard")
    client, run = _mlflow(logged_run)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.epochs"] == "2" and run.data.params["losses.kd.T"] == "4.0"
    for tag, points in want.items():
        assert [s for s, _ in board[tag]] == [s for s, _ in points], tag
        assert [v for _, v in board[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 events
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert history == points, tag


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_mlflow_run_and_event_folder(
    logged_run: tuple[Path, Any, Any], no_tracking_env: None, run_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DK_CACHE", str(run_cache))  # the run's own cache: its teacher, not another test's
    logged_run = logged_run[0]
    run_id = json.loads((logged_run / "loggers.json").read_text())["mlflow"]["run_id"]
    cfg = load_config(TINY, ["train.epochs=3", "log.tensorboard=true", "log.mlflow=true"])
    commands.compare(cfg, out=logged_run, resume=True, progress=False)  # extends each student stage by 1 epoch
    state = json.loads((logged_run / "loggers.json").read_text())
    assert state["mlflow"]["run_id"] == run_id
    records = _records(logged_run)
    assert state["mlflow"]["sent"] == state["tensorboard"]["sent"] == len(records)
    want = _expected(records)
    assert [s for s, _ in want["kd-s0/train/loss"]] == [1, 2, 3]
    board = _tensorboard(logged_run / "tensorboard")
    client, run = _mlflow(logged_run)
    assert run.info.status == "FINISHED"
    for tag in ("kd-s0/train/loss", "baseline-s0/test/student/top1"):
        assert [s for s, _ in board[tag]] == [s for s, _ in want[tag]]  # appended once, nothing twice
        assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)) == want[tag]


@pytest.mark.slow
def test_a_logger_switched_on_at_resume_gets_the_whole_run_and_a_failed_stage_fails_the_mlflow_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_tracking_env: None
) -> None:
    pytest.importorskip("mlflow")
    data = {"data": {"params": {"num_samples": 400, "transfer_samples": 0}}}
    dkn.train("mlp", "mnist1d", epochs=2, out=tmp_path, config=data)
    again = dkn.train("mlp", "mnist1d", epochs=2, out=tmp_path, resume=True, config={**data, "log": {"mlflow": True}})
    import gc

    gc.collect()  # the Python API closes its loggers when its session is collected
    client, run = _mlflow(tmp_path)
    assert run.info.status == "FINISHED"
    want = _expected(_records(tmp_path))
    assert (
        sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "mlp-s0/train/loss"))
        == want["mlp-s0/train/loss"]
        and again.accuracy == want["mlp-s0/test/student/top1"][-1][1]
    )

    from darkknowledge.engine.trainer import Trainer

    def broken(self: Trainer, resume: bool = False) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(Trainer, "fit", broken)
    with pytest.raises(RuntimeError, match="boom"):
        dkn.train("mlp", "mnist1d", epochs=2, out=tmp_path / "failed", config={**data, "log": {"mlflow": True}})
    gc.collect()
    assert _mlflow(tmp_path / "failed")[1].info.status == "FAILED"


@pytest.mark.slow
def test_off_a_terminal_each_stage_logs_each_epoch_with_the_whole_runs_eta(
    logged_run: tuple[Path, list[str], list[dict[str, Any]]],
) -> None:
    _, messages, entries = logged_run
    lines = [m.groupdict() for text in messages if (m := ETA_LINE.match(text))]
    trained = {e["name"]: e["epochs"] for e in entries if not e.get("reused_from")}  # a cached teacher is not
    per_stage: dict[str, list[int]] = {}
    for line in lines:
        per_stage.setdefault(line["stage"], []).append(int(line["epoch"]))
    assert per_stage == {name: list(range(1, n + 1)) for name, n in trained.items()}  # one line per epoch per stage
    assert {"baseline-s0", "kd-s0", "baseline-s1", "kd-s1"} <= set(per_stage)
    assert {line["scope"] for line in lines} == {"run"}
    # every stage here has as many batches per epoch, so at 1 s an epoch the ETA is the epochs left in the run
    assert [_seconds(line["eta"]) for line in lines] == list(range(len(lines) - 1, -1, -1))


@pytest.mark.slow
def test_the_eta_leaves_out_a_teacher_reused_from_the_cache(
    logged_run: tuple[Path, list[str], list[dict[str, Any]]], run_cache: Path, tmp_path: Path
) -> None:
    """The first run trained the teacher into ``run_cache``; a second run reuses it, and its ETA
    counts only the stages it trains (it once counted the teacher's epochs until the teacher was reached)."""
    assert any(line["stage"] == "teacher" for text in logged_run[1] if (line := ETA_LINE.match(text)))
    messages = _off_a_terminal(load_config(TINY, ["train.epochs=2"]), tmp_path / "again", run_cache)
    assert any(text.startswith("reusing the teacher trained earlier") for text in messages)
    lines = [m.groupdict() for text in messages if (m := ETA_LINE.match(text))]
    assert [line["stage"] for line in lines][:2] == ["baseline-s0", "baseline-s0"] and len(lines) == 8
    assert [_seconds(line["eta"]) for line in lines] == list(range(7, -1, -1))


@pytest.mark.slow
def test_dk_train_with_log_tensorboard_off_a_terminal(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    recipe = write_recipe(tmp_path / "tiny.yaml")
    proc = dk(
        "train", str(recipe), "--log", "tensorboard", "--out", str(tmp_path / "run"), "train.epochs=2", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    lines = [m.groupdict() for line in proc.stderr.splitlines() if (m := ETA_LINE.match(line))]
    assert [(d["stage"], d["epoch"], d["scope"]) for d in lines] == [
        ("student-ce-s0", "1", "run"),
        ("student-ce-s0", "2", "run"),
    ]
    assert lines[-1]["eta"] == "0s"
    board = _tensorboard(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in board["student-ce-s0/train/loss"]] == [1, 2]


@pytest.mark.slow
def test_a_language_model_run_sends_its_metrics_and_plans_the_variants_of_the_best_arm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("transformers")
    from darkknowledge.lm.config import validate_lm_config
    from darkknowledge.runs.lm_run import run_lm
    from lm_fixtures import lm_recipe

    monkeypatch.setenv("DK_CACHE", str(tmp_path / "cache"))
    ticks = iter(range(10_000))
    monkeypatch.setattr(eta, "_now", lambda: float(next(ticks)))  # every epoch takes 1 s
    monkeypatch.setattr(progress, "is_terminal", lambda: False)
    caplog.set_level(logging.INFO, logger="darkknowledge")
    raw = lm_recipe(tmp_path, seeds=[0, 1], variants={"of": "best", "caches": ["topk"]}, log={"tensorboard": True})
    run_lm(validate_lm_config(raw), out=tmp_path / "run", progress=True)
    want = _expected(_records(tmp_path / "run"))
    board = _tensorboard(tmp_path / "run" / "tensorboard")
    assert {"fkl-s1/train/loss", "fkl@topk-s0/test/student/loss"} <= set(want)
    for tag, points in want.items():
        assert [s for s, _ in board[tag]] == [s for s, _ in points], tag
        assert [v for _, v in board[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    lines = [m.groupdict() for r in caplog.records if (m := ETA_LINE.match(r.getMessage()))]
    assert [d["stage"] for d in lines] == ["ce-s0", "fkl-s0", "ce-s1", "fkl-s1", "fkl@topk-s0", "fkl@topk-s1"]
    # the variants' arm is chosen after the arms train; planned as `*@topk`, the ETA counts them from the start
    assert [_seconds(d["eta"]) for d in lines] == list(range(len(lines) - 1, -1, -1))
