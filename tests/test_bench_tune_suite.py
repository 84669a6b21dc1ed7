"""``dk tune SUITE``: every method gets the same trial budget on the validation split, and a
suite with ``hp: tuned`` trains with the chosen values and says so in its tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from darkknowledge.bench.cells import Cell
from darkknowledge.bench.runner import Bench
from darkknowledge.bench.suite import load_suite
from darkknowledge.bench.tuned import tune_suite, tuned_path
from darkknowledge.config import load_config

pytest.importorskip("optuna")

SUITE = {
    "name": "tiny",
    "seeds": [0, 1],
    "data": {
        "name": "mnist1d",
        "params": {"num_samples": 400, "transfer_samples": 0},
        "val_fraction": 0.2,
        "use_transfer": False,
        "batch_size": 64,
    },
    "budget": {"train": {"epochs": 1}},
    "pairs": {
        "cnn-mlp": {
            "teacher": {"name": "cnn1d", "params": {"channels": 8}, "train": {"epochs": 1}},
            "student": {"name": "mlp", "params": {"hidden": [16]}},
        }
    },
    "methods": {
        "dkd": {"recipe": "dkd"},
        "dist": {"recipe": "dist", "tune": {"losses.dist.T": {"low": 1.0, "high": 4.0}}},
    },
}


@pytest.mark.slow
def test_every_method_gets_the_same_trials_and_tuned_cells_are_marked(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(SUITE))
    bench = Bench(load_suite(str(path)), tmp_path / "b")
    summaries = tune_suite(bench, trials=2)
    assert {(s["pair"], s["method"]) for s in summaries} == {("cnn-mlp", m) for m in ("kd", "dkd", "dist")}
    for method in ("kd", "dkd", "dist"):
        record = json.loads(tuned_path(bench.results, "cnn-mlp", method).read_text())
        assert record["n_trials"] == record["budget"] == len(record["trials"]) == 2
        assert "test split was not read" in record["selected_on"]
        recipe = load_config(str(tuned_path(bench.results, "cnn-mlp", method).with_suffix(".yaml")))
        for dotted, value in record["values"].items():
            node = recipe.model_dump()
            for part in dotted.split("."):
                node = node[part]
            assert node == value
    dist = json.loads(tuned_path(bench.results, "cnn-mlp", "dist").read_text())
    assert set(dist["space"]) == {"losses.dist.T"}  # the suite's ranges replace the loss's own
    assert all(1.0 <= t["values"]["losses.dist.T"] <= 4.0 for t in dist["trials"])
    # no tuning run evaluated on the test split
    for cfg in (tmp_path / "b" / "tune").rglob("config.yaml"):
        assert yaml.safe_load(cfg.read_text())["data"]["holdout"] == "val"

    tuned = Bench(load_suite(str(path), ["hp=tuned"]), tmp_path / "b")
    st = tuned.run()
    assert not st.failed
    res = json.loads(Cell("cnn-mlp", "dkd", 1).result_path(tuned.results).read_text())
    chosen = json.loads(tuned_path(bench.results, "cnn-mlp", "dkd").read_text())["values"]
    assert res["hp"] == "tuned" and res["tuned"] == chosen
    for dotted, value in chosen.items():
        node = res["config"]
        for part in dotted.split("."):
            node = node[part]
        assert node == value
    base = json.loads(Cell("cnn-mlp", "ce", 1).result_path(tuned.results).read_text())
    assert base["hp"] == "default"  # the student alone has nothing to tune
    from darkknowledge.bench.publish import rows_of

    rows = {(r["pair"], r["method"]): r for r in rows_of(tuned)}
    assert rows[("cnn-mlp", "dkd")]["hp"] == "tuned" and rows[("cnn-mlp", "ce")]["hp"] == "default"
