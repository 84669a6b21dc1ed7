"""Benchmark tables and figures: every number recomputed from synthetic per-cell results."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys

import pytest

from darkknowledge.bench import figures
from darkknowledge.bench.markdown import to_markdown, to_markdown_compact
from darkknowledge.bench.tables import ROW_FIELDS, summarize, to_csv, to_json
from darkknowledge.errors import ConfigError
from darkknowledge.stats import t_quantile

TEACHER = {"model": "cnn1d", "hash": "ab12cd34", "last_acc": 92.3}
PUBLISHED = {("cnn1d-mlp", "kd"): {"value": 73.33, "protocol": "CRD: single run, last epoch"}}


def cell(method: str, seed, last, kind: str = "method", pair: str = "cnn1d-mlp", **kw) -> dict:
    out = {
        "suite": "cpu",
        "pair": pair,
        "method": method,
        "kind": kind,
        "seed": seed,
        "status": "done",
        "hp": "default",
        "last_acc": last,
        "best_acc": None if last is None else last - 0.5,
        "best_epoch": 17,
        "best_selected_on": "val",
        "train_seconds": 10.0 + (seed or 0),
        "teacher_seconds": 0.0 if kind == "baseline" else 4.0,
        "params": 15234,
        "extra_params": 0,
        "steps": 870,
        "epochs": 20,
        "teacher": None if kind == "baseline" else TEACHER,
        "student": "mlp",
        "members": [],
    }
    out.update(kw)
    return out


def cells() -> list[dict]:
    out = [cell("teacher", None, 92.3, kind="teacher", student="cnn1d", train_seconds=40.0, teacher_seconds=0.0)]
    out += [cell("ce", s, v, kind="baseline") for s, v in enumerate([70.0, 71.0, 72.0])]
    out += [cell("kd", s, v) for s, v in enumerate([71.0, 73.0, 72.5])]
    out += [
        cell("dkd", 0, 72.0, extra_params=2048),
        cell("dkd", 1, 72.0, hp="tuned", best_selected_on="test"),
        cell("dkd", 2, 74.0),
        cell("dkd", 3, 75.0),
        cell("dkd", 4, None, status="n/a", reason="diverged at epoch 3"),
    ]
    out += [cell("crd", s, None, status="n/a", reason="needs a | memory bank") for s in (0, 1)]
    out += [
        cell("mutual", s, v, members=[{"role": "peer1", "last_acc": p}, {"role": "peer2", "last_acc": p + 1}])
        for s, v, p in ((0, 71.5, 64.0), (1, 72.5, 66.0))
    ]
    # a second pair: its deltas must use its own baseline
    out += [cell("ce", s, v, kind="baseline", pair="resnet-tiny") for s, v in enumerate([50.0, 52.0])]
    out += [cell("kd", s, v, pair="resnet-tiny") for s, v in enumerate([55.0, 54.0])]
    return out


def by_method(rows: list[dict], pair: str = "cnn1d-mlp") -> dict[str, dict]:
    return {r["method"]: r for r in rows if r["pair"] == pair}


def expected_ci(diffs: list[float]) -> tuple[float, float, float]:
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = t_quantile(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def test_summarize_recomputes_the_cells():
    rows = summarize(cells(), PUBLISHED)
    assert all(tuple(r) == ROW_FIELDS for r in rows)
    assert [(r["pair"], r["method"]) for r in rows] == [
        ("cnn1d-mlp", m) for m in ("teacher", "ce", "kd", "dkd", "crd", "mutual", "mutual:peer1", "mutual:peer2")
    ] + [("resnet-tiny", "ce"), ("resnet-tiny", "kd")]
    r = by_method(rows)
    teacher, ce, kd, dkd = r["teacher"], r["ce"], r["kd"], r["dkd"]
    assert teacher["kind"] == "teacher" and teacher["seeds"] == [None] and teacher["last_mean"] == 92.3
    assert (teacher["teacher_model"], teacher["teacher_hash"], teacher["teacher_acc"]) == ("cnn1d", "ab12cd34", 92.3)

    assert ce["seeds"] == [0, 1, 2] and ce["n"] == 3 and ce["last_values"] == [70.0, 71.0, 72.0]
    assert (ce["last_mean"], ce["last_std"]) == pytest.approx((71.0, 1.0), abs=1e-12)
    assert ce["d_baseline_n"] is None and ce["d_baseline_mean"] is None  # no delta to itself
    m, lo, hi = expected_ci([-1.0, -2.0, -0.5])  # ce - kd
    assert (ce["d_kd_mean"], ce["d_kd_lo"], ce["d_kd_hi"], ce["d_kd_wins"]) == pytest.approx((m, lo, hi, 0))
    assert ce["teacher_s_mean"] == 0.0 and ce["teacher_hash"] is None

    assert kd["last_mean"] == pytest.approx(statistics.mean([71.0, 73.0, 72.5]), abs=1e-12)
    assert kd["last_std"] == pytest.approx(statistics.stdev([71.0, 73.0, 72.5]), abs=1e-12)
    assert kd["best_values"] == [70.5, 72.5, 72.0] and kd["best_selected_on"] == "val" and kd["best_n"] == 3
    m, lo, hi = expected_ci([1.0, 2.0, 0.5])
    assert (kd["d_baseline_mean"], kd["d_baseline_lo"], kd["d_baseline_hi"]) == pytest.approx((m, lo, hi), abs=1e-12)
    assert (kd["d_baseline_n"], kd["d_baseline_wins"], kd["d_baseline_ties"]) == (3, 3, 0)
    assert kd["d_kd_n"] is None and kd["d_kd_mean"] is None  # none for the kd row itself
    assert (kd["published_value"], kd["published_protocol"]) == (73.33, "CRD: single run, last epoch")
    assert kd["train_s_mean"] == pytest.approx(11.0) and kd["teacher_s_mean"] == 4.0
    assert kd["params"] == 15234 and kd["extra_params"] == 0 and kd["teacher_acc"] == 92.3

    # dkd: seed 3 has no baseline/kd partner, seed 4 is n/a; one seed tuned, one best picked on test
    assert dkd["seeds"] == [0, 1, 2, 3] and dkd["status"] == "partial" and dkd["hp"] == "mixed"
    assert dkd["na"] == [{"seed": 4, "reason": "diverged at epoch 3"}] and dkd["best_selected_on"] == "test"
    assert dkd["last_mean"] == pytest.approx(73.25) and dkd["extra_params"] == 512.0  # mean of 2048, 0, 0, 0
    m, lo, hi = expected_ci([2.0, 1.0, 2.0])
    assert (dkd["d_baseline_mean"], dkd["d_baseline_lo"], dkd["d_baseline_hi"]) == pytest.approx((m, lo, hi))
    assert (dkd["d_baseline_n"], dkd["d_baseline_wins"]) == (3, 3)
    m, lo, hi = expected_ci([1.0, -1.0, 1.5])
    assert (dkd["d_kd_mean"], dkd["d_kd_lo"], dkd["d_kd_hi"]) == pytest.approx((m, lo, hi))
    assert (dkd["d_kd_n"], dkd["d_kd_wins"]) == (3, 2)

    crd = r["crd"]
    assert crd["status"] == "n/a" and crd["n"] == 0 and crd["last_mean"] is None and crd["seeds"] == []
    assert crd["na"] == [{"seed": 0, "reason": "needs a | memory bank"}, {"seed": 1, "reason": "needs a | memory bank"}]
    assert crd["d_baseline_n"] == 0 and crd["d_baseline_mean"] is None and crd["published_value"] is None

    mutual, peer1, peer2 = r["mutual"], r["mutual:peer1"], r["mutual:peer2"]
    m, lo, hi = expected_ci([1.5, 1.5])  # two pairs, zero spread: a zero-width interval
    assert (mutual["d_baseline_mean"], mutual["d_baseline_lo"], mutual["d_baseline_hi"]) == pytest.approx((m, lo, hi))
    assert peer1["kind"] == "member" and peer1["parent"] == "mutual" and peer1["seeds"] == [0, 1]
    assert (peer1["last_mean"], peer1["last_std"]) == pytest.approx((65.0, math.sqrt(2.0)))
    assert peer2["last_values"] == [65.0, 67.0]
    assert all(peer1[k] is None for k in ("d_baseline_mean", "d_kd_mean", "d_baseline_n", "train_s_mean", "params"))

    other = by_method(rows, "resnet-tiny")
    m, lo, hi = expected_ci([5.0, 2.0])
    assert (other["kd"]["d_baseline_mean"], other["kd"]["d_baseline_lo"]) == pytest.approx((m, lo))
    assert other["kd"]["published_value"] is None  # published is keyed by (pair, method)


def test_teacher_row_takes_model_and_hash_from_the_students_cells():
    # the runner's teacher cell may carry no teacher dict; the students' cells name the teacher they used
    rows = summarize([cell("teacher", None, 91.0, kind="teacher", teacher=None), cell("kd", 0, 71.0)])
    teacher = by_method(rows)["teacher"]
    assert (teacher["teacher_model"], teacher["teacher_hash"], teacher["teacher_acc"]) == ("cnn1d", "ab12cd34", 91.0)
    assert "Teacher: **cnn1d**, 91.00% last-epoch test accuracy, hash `ab12cd34`." in to_markdown(rows)
    # no teacher cell at all (a given checkpoint): the header still names it, from the students' cells
    text = to_markdown(summarize([cell("kd", 0, 71.0)]))
    assert "Teacher: **cnn1d**, 92.30% last-epoch test accuracy, hash `ab12cd34`." in text


def test_single_seed_has_no_interval_and_level_is_used():
    rows = summarize([cell("ce", 0, 70.0, kind="baseline"), cell("kd", 0, 71.0)], level=0.9)
    kd = by_method(rows)["kd"]
    assert kd["d_baseline_n"] == 1 and kd["d_baseline_mean"] == 1.0 and kd["d_baseline_lo"] is None
    assert kd["ci_level"] == 0.9 and kd["last_std"] == 0.0
    text = to_markdown(rows)
    assert "+1.00 (1 seed)" in text and "90% t-CI" in text and "Δ student [90% CI]" in text


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"kind": "student"}, "kind='student'"),
        ({"status": "failed"}, "status='failed'"),
        ({"last_acc": float("nan")}, "last_acc=nan"),
        ({"last_acc": None}, "last_acc=None"),
        ({"method": ""}, "needs a method"),
    ],
)
def test_bad_cells_are_one_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        summarize([{**cell("kd", 0, 71.0), **bad}])


def test_duplicate_cells_and_bad_published_are_refused():
    with pytest.raises(ConfigError, match="appears twice"):
        summarize([cell("kd", 0, 71.0), cell("kd", 0, 72.0)])
    with pytest.raises(ConfigError, match="has no 'status'"):
        summarize([{"pair": "p", "kind": "method", "method": "kd"}])
    with pytest.raises(ConfigError, match="expected"):
        summarize([cell("kd", 0, 71.0)], {("cnn1d-mlp", "kd"): {"protocol": "no value"}})


def test_json_round_trip_keeps_rows_exactly():
    rows = summarize(cells(), PUBLISHED)
    assert json.loads(to_json(rows)) == rows


def test_csv_parses_back_to_the_rows():
    rows = summarize(cells(), PUBLISHED)
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert len(parsed) == len(rows)
    for row, back in zip(rows, parsed):
        assert tuple(back) == ROW_FIELDS
        for key, value in row.items():
            text = back[key]
            if isinstance(value, list):
                assert json.loads(text) == value
            elif value is None:
                assert text == ""
            elif isinstance(value, (int, float)):
                assert float(text) == value  # full precision
            else:
                assert text == value


def _table_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("|")]


def test_markdown_tables_per_pair():
    rows = summarize(cells(), PUBLISHED)
    text = to_markdown(rows, title="suite cpu")
    assert text.startswith("## suite cpu")
    assert text.count("### cnn1d-mlp") == 1 and text.count("### resnet-tiny") == 1
    assert "Teacher: **cnn1d**, 92.30% last-epoch test accuracy, hash `ab12cd34`. Student: **mlp**." in text
    assert text.count("mean ± sample std over the listed seeds") == 2
    assert "test accuracy at the epoch best on the validation split" in text
    lines = _table_lines(text)
    widths = {ln.replace("\\|", "").count("|") for ln in lines}
    assert widths == {15}  # 14 columns in every header, separator and row
    kd_line = next(ln for ln in lines if ln.startswith("| kd | default | 0,1,2 |"))
    m, lo, hi = expected_ci([1.0, 2.0, 0.5])
    kd = by_method(rows)["kd"]
    assert f"| {kd['last_mean']:.2f} ± {kd['last_std']:.2f} |" in kd_line
    assert f"| {m:+.2f} [{lo:+.2f}, {hi:+.2f}] | 3/3 |" in kd_line
    assert "73.33 (CRD: single run, last epoch)" in kd_line
    crd_line = next(ln for ln in lines if ln.startswith("| crd |"))
    assert "| n/a |" in crd_line
    assert "- `crd` n/a (seeds 0, 1): needs a \\| memory bank" in text
    assert "- `dkd` n/a (seed 4): diverged at epoch 3" in text
    dkd_line = next(ln for ln in lines if ln.startswith("| dkd |"))
    assert "(test-selected)" in dkd_line and "| mixed |" in dkd_line and "(+1 n/a)" in dkd_line
    assert "`dkd`: its best-epoch column was selected on the **test** split" in text
    assert any(ln.startswith("| mutual:peer1 |") for ln in lines)
    assert any(ln.startswith("| teacher (cnn1d) |") and "92.30 (n=1)" in ln for ln in lines)


def test_markdown_compact_one_line_per_pair_and_method():
    rows = summarize(cells(), PUBLISHED)
    lines = _table_lines(to_markdown_compact(rows))[2:]
    assert len(lines) == sum(r["kind"] != "member" for r in rows) == 8
    assert not any("peer1" in ln for ln in lines)
    m, lo, hi = expected_ci([5.0, 2.0])
    assert any(
        ln.startswith("| resnet-tiny | kd |") and f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}] | 2/2 |" in ln for ln in lines
    )
    kd_line = next(ln for ln in lines if ln.startswith("| cnn1d-mlp | kd |"))
    assert kd_line.endswith("| 73.33 (CRD: single run, last epoch) |")  # the paper's number beside ours
    assert {ln.replace("\\|", "").count("|") for ln in lines} == {12}
    plain = _table_lines(to_markdown_compact(summarize(cells())))
    assert {ln.replace("\\|", "").count("|") for ln in plain} == {11}  # no papers' numbers: no column


def test_figures_write_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    rows = summarize(cells(), PUBLISHED)
    for draw, name in ((figures.bar_chart, "bars.png"), (figures.cost_plot, "cost.png")):
        out = draw(rows, tmp_path / "figs" / name)
        data = out.read_bytes()
        assert out == tmp_path / "figs" / name and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["bars.png", "cost.png"]  # no temp files left


def test_figures_refuse_empty_rows_and_missing_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    only_na = summarize([cell("crd", 0, None, status="n/a", reason="x")])
    with pytest.raises(ConfigError, match="nothing to plot"):
        figures.bar_chart(only_na, tmp_path / "a.png")
    with pytest.raises(ConfigError, match="nothing to plot"):
        figures.cost_plot(only_na, tmp_path / "b.png")
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)  # import of these now fails
    with pytest.raises(ConfigError, match="pip install matplotlib"):
        figures.bar_chart(summarize(cells()), tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
