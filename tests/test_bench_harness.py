"""``dk bench``: a small suite killed mid-way and resumed (no cell run twice), tables recomputed
from the per-cell results (real paired CIs), stale cells, executors, bad suites."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from darkknowledge.bench.cells import Cell
from darkknowledge.bench.execute import prepare_work_dir, run_cell
from darkknowledge.bench.runner import Bench
from darkknowledge.bench.suite import load_suite, suite_names
from darkknowledge.errors import ConfigError

SMALL = {
    "name": "small",
    "seeds": [0, 1, 2],
    "data": {
        "name": "mnist1d",
        "params": {"num_samples": 500, "transfer_samples": 0},
        "val_fraction": 0.1,
        "use_transfer": False,
        "batch_size": 64,
    },
    "budget": {"train": {"epochs": 2, "optimizer": {"name": "adamw", "lr": 0.003}}},
    "pairs": {
        "cnn-cnn8": {
            "kind": "same family",
            "teacher": {"name": "cnn1d", "params": {"channels": 16}, "train": {"epochs": 2}},
            "student": {"name": "cnn1d", "params": {"channels": 4}},
        },
        "cnn-mlp": {
            "kind": "different families",
            "teacher": {"name": "cnn1d", "params": {"channels": 8}, "train": {"epochs": 2}},
            "student": {"name": "mlp", "params": {"hidden": [16]}},
        },
    },
    "methods": {"kd": {"recipe": "kd"}, "dkd": {"recipe": "dkd"}, "dist": {"recipe": "dist"}},
}
"""2 pairs x 3 methods (kd, dkd, dist) x 3 seeds, plus the 2 teachers and 6 baselines: 26 cells."""


def write_suite(tmp_path: Path, suite: dict, name: str = "small.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(suite))
    return path


def dk(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "darkknowledge.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_suite_resumes_without_running_a_cell_twice(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, SMALL)
    out, results = tmp_path / "bench", tmp_path / "results"
    args = ["bench", str(suite), "--out", str(out), "--results", str(results)]
    proc = dk(*args, cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(results.rglob("s*.json"))) < 8:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, mid-suite
    proc.wait()
    first = events(out)
    ended_first = {e["cell"] for e in first if e["event"] == "end"}
    assert 8 <= len(ended_first) < 26, "the kill did not land mid-suite"

    done = dk(*args, cwd=tmp_path)
    text, _ = done.communicate(timeout=600)
    assert done.returncode == 0, text
    second = events(out)[len(first) :]
    assert not ended_first & {e["cell"] for e in second}, "a finished cell was queued again"
    ends = [e["cell"] for e in first + second if e["event"] == "end"]
    assert len(ends) == len(set(ends)) == 26  # every cell ran to its end exactly once
    assert "done 26, stale 0, to run 0" in text

    # the tables are recomputed from the per-cell results, and the CI is a real paired t-interval
    bench = Bench(load_suite(str(suite)), out, results)
    cells = {(r["pair"], r["method"], r["seed"]): r for r in bench.finished_results()}
    rows = {(r["pair"], r["method"]): r for r in json.loads((results / "tables" / "small.json").read_text())}
    scipy_stats = pytest.importorskip("scipy.stats")
    for pair in SMALL["pairs"]:
        for method in ("kd", "dkd", "dist"):
            own = [cells[(pair, method, s)]["last_acc"] for s in SMALL["seeds"]]
            base = [cells[(pair, "ce", s)]["last_acc"] for s in SMALL["seeds"]]
            row = rows[(pair, method)]
            assert row["last_values"] == own and row["seeds"] == SMALL["seeds"]
            assert row["last_mean"] == pytest.approx(statistics.fmean(own))
            assert row["last_std"] == pytest.approx(statistics.stdev(own))
            diffs = [a - b for a, b in zip(own, base)]
            half = scipy_stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
            assert row["d_baseline_mean"] == pytest.approx(statistics.fmean(diffs))
            assert row["d_baseline_lo"] == pytest.approx(statistics.fmean(diffs) - half)
            assert row["d_baseline_hi"] == pytest.approx(statistics.fmean(diffs) + half)
            assert row["d_baseline_wins"] == sum(d > 0 for d in diffs)
            assert row["train_s_mean"] == pytest.approx(
                statistics.fmean(cells[(pair, method, s)]["train_seconds"] for s in SMALL["seeds"])
            )
        teacher = json.loads((results / pair / "teacher.json").read_text())
        assert {cells[(pair, "kd", s)]["teacher"]["hash"] for s in SMALL["seeds"]} == {teacher["hash"]}
    # same initialisation: the baseline and a method of one seed start from the same weights
    ce0 = cells[("cnn-mlp", "ce", 0)]["config"]
    assert ce0["seed"] == cells[("cnn-mlp", "kd", 0)]["config"]["seed"] == 0
    assert ce0["train"] == cells[("cnn-mlp", "dist", 0)]["config"]["train"]  # the same budget
    md = (results / "tables" / "small.md").read_text()
    assert f"{rows[('cnn-mlp', 'dkd')]['last_mean']:.2f} ± {rows[('cnn-mlp', 'dkd')]['last_std']:.2f}" in md


def test_changed_recipe_makes_its_cells_stale(tmp_path: Path) -> None:
    small = {
        **SMALL,
        "seeds": [0],
        "pairs": {"cnn-mlp": SMALL["pairs"]["cnn-mlp"]},
        "methods": {"dkd": {"recipe": "dkd"}},
    }
    path = write_suite(tmp_path, small)
    bench = Bench(load_suite(str(path)), tmp_path / "b")
    st = bench.run()
    assert len(st.done) == 4 and not st.failed  # teacher, ce, kd, dkd
    assert bench.teacher_info("cnn-mlp")["checkpoint"] == str((bench.results / "cnn-mlp" / "teacher.pt").resolve())
    changed = {**small, "methods": {"dkd": {"recipe": "dkd", "overrides": {"losses.dkd.beta": 2.0}}}}
    bench2 = Bench(load_suite(str(write_suite(tmp_path, changed))), tmp_path / "b")
    st2 = bench2.status()
    assert [c.id for c in st2.stale] == ["cnn-mlp/dkd/s0"]
    assert "stale (config changed since it ran): cnn-mlp/dkd/s0" in "\n".join(st2.lines())
    assert {r["method"] for r in bench2.finished_results()} == {"teacher", "ce", "kd"}  # the stale one is left out
    before = len(events(tmp_path / "b"))
    bench2.run()
    rerun = [e["cell"] for e in events(tmp_path / "b")[before:] if e["event"] == "end"]
    assert rerun == ["cnn-mlp/dkd/s0"]
    res = json.loads(Cell("cnn-mlp", "dkd", 0).result_path(bench2.results).read_text())
    assert res["config"]["losses"]["dkd"]["beta"] == 2.0


def test_cell_killed_after_training_before_its_result_resumes_its_run(tmp_path: Path) -> None:
    """A kill between a cell's trained stage and its result file: the next bench resumes that run
    folder (it does not start a fresh run there, which would refuse the folder and mark the cell n/a)."""
    small = {**SMALL, "seeds": [0], "pairs": {"cnn-mlp": SMALL["pairs"]["cnn-mlp"]}, "methods": {}}
    bench = Bench(load_suite(str(write_suite(tmp_path, small))), tmp_path / "b")
    task = bench.task(Cell("cnn-mlp", "teacher"))
    first = run_cell(task)
    assert first["status"] == "done"
    Path(task.result_path).unlink()  # the kill landed after the run trained, before the result was written
    assert prepare_work_dir(task), "the cell's started run folder was not recognised"
    again = run_cell(task)
    assert again["status"] == "done", again.get("reason")
    assert again["last_acc"] == first["last_acc"] and again["hash"] == first["hash"]


def test_inapplicable_method_is_recorded_not_applicable(tmp_path: Path) -> None:
    small = {
        **SMALL,
        "seeds": [0],
        "pairs": {"cnn-mlp": SMALL["pairs"]["cnn-mlp"]},
        "methods": {"at": {"recipe": "at"}},
    }
    bench = Bench(load_suite(str(write_suite(tmp_path, small))), tmp_path / "b", only=["cnn-mlp/at"])
    st = bench.run()
    assert not st.failed
    res = json.loads(Cell("cnn-mlp", "at", 0).result_path(bench.results).read_text())
    assert res["status"] == "n/a" and "feature map" in res["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "submitit"])
def test_parallel_executors_run_every_cell(tmp_path: Path, executor: str) -> None:
    if executor == "submitit":
        pytest.importorskip("submitit")
    small = {
        **SMALL,
        "seeds": [0, 1],
        "pairs": {"cnn-mlp": SMALL["pairs"]["cnn-mlp"]},
        "methods": {"kd": {"recipe": "kd"}},
    }
    path = write_suite(tmp_path, small)
    extra = ["--cluster", "local"] if executor == "submitit" else []
    proc = dk(
        "bench", str(path), "--out", str(tmp_path / "b"), "--jobs", "2", "--executor", executor, *extra, cwd=tmp_path
    )
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    assert "done 5, stale 0, to run 0" in text  # teacher + 2 x (ce, kd)
    ends = [e["cell"] for e in events(tmp_path / "b") if e["event"] == "end"]
    assert sorted(ends) == sorted(
        ["cnn-mlp/teacher", "cnn-mlp/ce/s0", "cnn-mlp/ce/s1", "cnn-mlp/kd/s0", "cnn-mlp/kd/s1"]
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"methods": {"dkd": {"recipe": "dkd", "pairs": ["nope"]}}}, "methods.dkd.pairs: unknown pair 'nope'"),
        ({"methods": {"dkd": {"recipe": "dkd", "overrides": {"train.epochs": 99}}}}, "a method cannot change 'train'"),
        ({"methods": {"dkd": {"recipe": "dkd", "overrides": {"teacher.name": "mlp"}}}}, "cannot change 'teacher'"),
        ({"methods": {"ce": {"recipe": "kd"}}}, "methods.ce"),
        ({"methods": {"x": {"recipe": "no_such_recipe"}}}, "unknown recipe 'no_such_recipe'"),
        ({"pairs": {"a/b": SMALL["pairs"]["cnn-mlp"]}}, "pair name 'a/b'"),
        ({"methods": {"dkd": {"recipe": "dkd", "overrides": {"losses.dkd.bogus": 1}}}}, "bogus"),
        ({"seeds": []}, "seeds"),
    ],
)
def test_bad_suites_fail_before_anything_runs(tmp_path: Path, change: dict, message: str) -> None:
    path = write_suite(tmp_path, {**SMALL, **change})
    with pytest.raises(ConfigError, match=None) as err:
        Bench(load_suite(str(path)), tmp_path / "b")
    assert message in str(err.value)
    assert not (tmp_path / "b").exists()


def test_cli_reports_a_bad_suite_in_one_line(tmp_path: Path) -> None:
    path = write_suite(tmp_path, {**SMALL, "methods": {"x": {"recipe": "kd", "pairs": ["nope"]}}})
    proc = dk("bench", str(path), "--out", str(tmp_path / "b"), cwd=tmp_path)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert text.strip().splitlines()[-1].startswith("dk: error: ") and "unknown pair 'nope'" in text


@pytest.mark.parametrize("name", suite_names())
def test_shipped_suites_build_every_cell(name: str) -> None:
    suite = load_suite(name)
    bench = Bench(suite, Path("/nonexistent/never-written"))
    assert len(suite.seeds) >= 3  # mean ± std and paired CIs over seeds (the CPU-heavy data-free suites: 3)
    kinds = {c.kind for c in bench.cells}
    assert "baseline" in kinds and "method" in kinds
    for pair in suite.pairs:  # every pair: the student alone and kd on every seed
        for seed in suite.seeds:
            assert Cell(pair, "ce", seed) in bench.cells and Cell(pair, "kd", seed) in bench.cells


def test_pair_overrides_reach_only_their_pair(tmp_path: Path) -> None:
    suite = {**SMALL, "methods": {"dkd": {"recipe": "dkd", "overrides": {"losses.dkd.beta": 2.0}}}}
    suite["pairs"] = {k: dict(v) for k, v in SMALL["pairs"].items()}
    suite["pairs"]["cnn-mlp"]["overrides"] = {"dkd": {"losses.dkd.beta": 6.0}}
    bench = Bench(load_suite(str(write_suite(tmp_path, suite))), tmp_path / "b")
    assert bench.raw_default(Cell("cnn-mlp", "dkd", 0), None)["losses"]["dkd"]["beta"] == 6.0
    assert bench.raw_default(Cell("cnn-cnn8", "dkd", 0), None)["losses"]["dkd"]["beta"] == 2.0
    suite["pairs"]["cnn-mlp"]["overrides"] = {"dkd": {"train.epochs": 5}}
    with pytest.raises(ConfigError, match="pairs.cnn-mlp.overrides.dkd.train.epochs"):
        load_suite(str(write_suite(tmp_path, suite)))
    suite["pairs"]["cnn-mlp"]["overrides"] = {"fitnet": {"losses.fitnet.weight": 5}}
    with pytest.raises(ConfigError, match="no method 'fitnet' runs on pair 'cnn-mlp'"):
        load_suite(str(write_suite(tmp_path, suite)))


def test_a_pairs_views_reach_its_cells() -> None:
    """Cross-modal pairs: the teacher's and the student's views (and the derived views) are part of
    every cell's config, so a cell's teacher reads the view it was trained on."""
    bench = Bench(load_suite("cross-modal"), Path("/nonexistent/never-written"))
    raw = bench._raw(Cell("pi-300", "gd_t10", 0), "/some/teacher.pt")
    assert raw["teacher"] == {
        "name": "mlp",
        "params": {"hidden": [20, 20]},
        "input": "image",
        "checkpoint": "/some/teacher.pt",
    }
    assert raw["student"]["input"] == "small" and raw["data"]["views"]["small"]["transform"] == "downsample"
    assert bench._raw(Cell("pi-300", "teacher"), None)["teacher"]["input"] == "image"
