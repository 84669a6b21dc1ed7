"""README's language-model table is `dk run lm`'s output on the committed results, never typed by hand.

``benchmarks/runs/lm/`` holds the run's ``results.json``, ``config.yaml`` and ``report.md`` (not the
weights); the README block between ``<!-- run:lm -->`` markers must equal the table and verdict
rendered from those results, and the results must be complete and come from the shipped recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from darkknowledge.bench.publish import readme_section
from darkknowledge.commands import lm_config
from darkknowledge.runs.lm_report import lm_rows, table_lines, verdicts
from darkknowledge.runs.lm_run import baseline_arm

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "runs" / "lm"


@pytest.fixture(scope="module")
def results() -> list[dict]:
    path = RUN / "results.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing: `dk run lm --out benchmarks/runs/lm --readme README.md` writes it")
    return json.loads(path.read_text(encoding="utf-8"))["models"]


def test_readme_block_is_the_runs_output(results: list[dict]) -> None:
    cfg = lm_config("lm")
    base = baseline_arm(cfg)
    rows = lm_rows(results, base)
    teacher = next(e for e in results if e.get("role") == "teacher")
    expected = "\n".join(table_lines(rows, teacher)) + "\n\n" + "\n".join(verdicts(rows, base)) + "\n"
    actual = readme_section((ROOT / "README.md").read_text(encoding="utf-8"), "lm", kind="run")
    assert actual == expected, "README's run:lm block differs from benchmarks/runs/lm: re-run `dk run lm --readme`"


def test_committed_run_is_the_shipped_recipe_complete(results: list[dict]) -> None:
    cfg = lm_config("lm")
    # read through the config model: a field added since the run (at its default) is not a difference
    ran = type(cfg).model_validate(yaml.safe_load((RUN / "config.yaml").read_text(encoding="utf-8")))
    ran = ran.model_dump(mode="json")
    shipped = cfg.model_dump(mode="json")
    for key in ("data", "teacher", "student", "cache", "arms", "variants", "train", "seeds"):
        assert ran[key] == shipped[key], (
            f"benchmarks/runs/lm ran a different {key!r} than darkknowledge/recipes/lm.yaml"
        )
    names = {e["name"] for e in results if e.get("role") in ("student", "baseline")}
    for seed in cfg.seeds:
        for arm in cfg.arms:
            assert f"{arm}-s{seed}" in names
    variants = {n.split("@")[1].rsplit("-s", 1)[0] for n in names if "@" in n}
    assert variants == set(cfg.variants.caches)
    assert all(e.get("heldout_ppl", 0) > 0 for e in results)
