"""`dk search` end to end on a tiny space: trials, the front retrained, the report, and a resume."""

from __future__ import annotations

import json

import pytest
import yaml

from darkknowledge.bench.search_command import load_search, search_command
from darkknowledge.errors import ConfigError
from helpers import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def _files(tmp_path, **search):
    recipe = {
        **TINY,
        "data": {**TINY["data"], "val_fraction": 0.2},
        "train": {**TINY["train"], "epochs": 2},
        "teacher": {**TINY["teacher"], "train": {"epochs": 2}},
        "student": {"name": "cnn1d", "params": {"channels": 8}},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    spec = {
        "name": "tiny",
        "recipe": str(tmp_path / "r.yaml"),
        "space": {"model": "cnn1d", "params": {"channels": [4, 8], "depth": [2, 3]}, "ops": ["plain"]},
        "limits": {"flops": "reference"},
        "trials": 3,
        "proxy": {"epochs": 1},
        "final": {"count": 1, "seeds": [0]},
        **search,
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_search_finds_a_front_retrains_it_and_resumes_without_rerunning(tmp_path, monkeypatch):
    path = _files(tmp_path)
    res = search_command(str(path), tmp_path / "out")
    trials = json.loads((tmp_path / "out" / "trials.json").read_text())["trials"]
    reference_flops = res["final"][0]["profile"]["flops"]
    assert res["final"][0]["tag"] == "reference" and len(res["final"]) == 2
    for r in trials:  # a candidate over the reference's FLOPs never got a proxy run
        assert (r["state"] == "infeasible") == (r["metrics"]["flops"] > reference_flops)
    front = res["final"][1]
    assert front["profile"]["flops"] <= reference_flops and len(front["accs"]) == 1
    report = (tmp_path / "out" / "search.md").read_text()
    assert "## Full budget" in report and "Kendall tau" in report
    calls = []
    from darkknowledge import commands

    monkeypatch.setattr(commands, "distill", lambda *a, **k: calls.append(a) or pytest.fail("ran again"))
    again = search_command(str(path), tmp_path / "out")  # everything recorded: nothing trains
    assert not calls and [f["accs"] for f in again["final"]] == [f["accs"] for f in res["final"]]


def test_bad_search_files_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown search 'nope'.*cnn1d"):
        load_search("nope")
    path = _files(tmp_path, trials=0)
    with pytest.raises(ConfigError, match="trials"):
        load_search(str(path))
    assert load_search("cnn1d").limits == {"flops": "reference"}
