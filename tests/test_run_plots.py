"""A dk run folder holds its figures, embedded in report.md by relative path, drawn from the run's
own metrics; without matplotlib the report says so and the tables stay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from darkknowledge import commands
from darkknowledge.config import load_config
from darkknowledge.runs import run_plots
from helpers import TINY

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("plots") / "run"
    commands.compare(load_config(TINY), out=out, progress=False)
    return out


def test_figures_are_in_the_folder_and_embedded_in_the_report(run: Path) -> None:
    report = (run / "report.md").read_text(encoding="utf-8")
    for name in ("curves.png", "comparison.png", "cost.png"):
        assert (run / name).read_bytes().startswith(PNG), name
        assert f"]({name})" in report  # relative: readable wherever the folder is opened
    assert report.index("## Figures") < report.index("## Student report")


def test_learning_curves_plot_the_runs_own_evaluations(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    entries = json.loads((run / "results.json").read_text())["models"]
    figures = {}
    monkeypatch.setattr(run_plots, "save_png", lambda fig, path: figures.setdefault(Path(path).name, fig) and path)
    from darkknowledge.runs.report import group_rows

    run_plots.run_figures(run, entries, group_rows(entries), records)
    acc_ax, loss_ax = figures["curves.png"].axes
    lines = {tuple(line.get_ydata()) for line in acc_ax.get_lines() if line.get_linestyle() != "--"}
    for e in entries:
        if e["role"] == "teacher":
            continue
        want = tuple(
            r["test"]["student"]["top1"] for r in records if r.get("stage") == e["name"] and r["kind"] == "eval"
        )
        assert want in lines, e["name"]  # one line per trained model and seed, its evaluations in order
        assert want[-1] == pytest.approx(e["last_acc"])
    teacher = next(e for e in entries if e["role"] == "teacher")
    refs = [line.get_ydata()[0] for line in acc_ax.get_lines() if line.get_linestyle() == "--"]
    assert refs == [pytest.approx(teacher["last_acc"])]  # the teacher as a reference line
    assert {t.get_text().split(" (")[0] for t in loss_ax.get_legend().get_texts()} == {"ce", "kd"}


def test_without_matplotlib_the_report_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(run_plots, "have_matplotlib", lambda: False)
    entry = {"name": "a", "role": "baseline", "model": "mlp", "last_acc": 1.0}
    lines = run_plots.run_figures(tmp_path, [entry], [], [])
    assert lines[0] == "## Figures" and "matplotlib is not installed" in lines[-1]
    assert not list(tmp_path.iterdir())
    assert run_plots.run_figures(None, [entry], [], []) == []  # no folder: nothing drawn
