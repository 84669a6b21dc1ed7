"""Measured results of a method, read from the committed benchmark files (never typed by hand).

Three sources, each written by darkknowledge itself:

* the benchmark suites' tables, ``benchmarks/results/SUITE/tables/SUITE.json`` (``dk bench SUITE
  --tables`` writes them from the per-cell results; README's tables are rendered from the same
  rows with :func:`darkknowledge.bench.markdown.to_markdown_compact`, as here);
* the reports of committed runs, ``benchmarks/runs/RECIPE/report.md`` (``dk run RECIPE``): the
  headline table and the verdict;
* the language-model run ``benchmarks/runs/lm/results.json`` (``dk run lm``), rendered with
  :mod:`darkknowledge.runs.lm_report` as the run renders it.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from darkknowledge.bench import markdown
from dkdocs.recipes import losses_of, recipe, scheme_of, synthesizer_of


def wide(text: str) -> str:
    """Markdown ``text`` whose tables keep one line per cell and scroll sideways (``docs/stylesheets/extra.css``)."""
    return f'<div class="dk-results" markdown>\n\n{text.strip()}\n\n</div>\n'


@cache
def suites(root: Path) -> dict[str, list[dict[str, Any]]]:
    """``suite -> rows`` of every committed suite table (``benchmarks/results/*/tables/*.json``)."""
    found = {}
    for path in sorted((root / "benchmarks" / "results").glob("*/tables/*.json")):
        if path.stem == path.parent.parent.name:
            found[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    return found


@cache
def suite_methods(root: Path, suite: str) -> dict[str, dict[str, Any]]:
    """The ``methods`` section of a shipped suite file (``darkknowledge/bench/suites/SUITE.yaml``)."""
    path = root / "darkknowledge" / "bench" / "suites" / f"{suite}.yaml"
    if not path.is_file():
        return {}
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("methods") or {}


@cache
def suite_description(root: Path, suite: str) -> str:
    path = root / "darkknowledge" / "bench" / "suites" / f"{suite}.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("description", "") if path.is_file() else ""


def _uses(kind: str, name: str, method: str, spec: dict[str, Any]) -> bool:
    """Whether the suite method ``method`` (``{recipe, overrides}``) trains ``name``."""
    if method == name:
        return True
    spec_recipe = spec.get("recipe")
    if not spec_recipe or (kind == "scheme" and name == "offline"):  # every plain loss row is offline: not a row of it
        return False
    overrides = set(spec.get("overrides") or {})
    changed = {"scheme", "scheme.name"} | (
        {"scheme.params", "scheme.params.synthesizer", "scheme.params.synthesizer.name"}
        if kind == "synthesizer"
        else set()
    )
    if overrides & changed:
        return False  # the method swaps the recipe's scheme (synthesiser): judged by its name only
    raw = recipe(spec_recipe)
    if kind == "loss":
        return spec_recipe == name and name in losses_of(raw)
    if kind == "scheme":
        return scheme_of(raw) == name
    return synthesizer_of(raw) == name


@cache
def suite_rows(root: Path, kind: str, name: str) -> dict[str, list[dict[str, Any]]]:
    """``suite -> rows`` measuring ``name``: the teacher and the student alone of each pair it ran
    on, then its own rows (a scheme's members included)."""
    found = {}
    for suite, rows in suites(root).items():
        specs = suite_methods(root, suite)
        methods = {
            r["method"]
            for r in rows
            if r["kind"] == "method" and _uses(kind, name, r["method"], specs.get(r["method"], {}))
        }
        if not methods:
            continue
        pairs = {r["pair"] for r in rows if r["method"] in methods}
        keep = [
            r
            for r in rows
            if r["pair"] in pairs
            and (r["kind"] in ("teacher", "baseline") or r["method"] in methods or r.get("parent") in methods)
        ]
        found[suite] = keep
    return found


def suite_table(rows: list[dict[str, Any]]) -> str:
    """The rows as README shows a suite (the compact table), then the reasons of any n/a cell."""
    text = wide(markdown.to_markdown_compact(rows))
    reasons: dict[tuple[str, str], str] = {}
    for r in rows:
        for na in r.get("na") or []:
            reasons.setdefault((r["pair"], r["method"]), na["reason"])
    if reasons:
        text += "\n" + "\n".join(
            f"- `{m}` on `{p}` is n/a: {markdown._esc(reason)}" for (p, m), reason in reasons.items()
        )
        text += "\n"
    members = sorted({r["method"] for r in rows if r["kind"] == "member"})
    if members:
        text += (
            "\nThe models the scheme trains besides its student ("
            + ", ".join(f"`{m}`" for m in members)
            + ") have their own rows in the suite's full table.\n"
        )
    return text


def run_report(root: Path, name: str | None) -> str | None:
    """The headline of ``benchmarks/runs/NAME/report.md`` (recipe NAME): its title, first table and verdict."""
    if name is None:
        return None
    path = root / "benchmarks" / "runs" / name / "report.md"
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[str] = []
    for line in lines:
        if line.startswith("## "):  # the sections after the headline (samples, losses, student report)
            break
        if line.startswith("# "):
            out.append(f"**`dk run {name}`**: {line[2:].strip()}")
            continue
        if line.startswith("!["):  # figures stay in the run folder
            continue
        if line.startswith("- ") and out and out[-1].strip() and not out[-1].startswith("- "):
            out.append("")  # a list right after a paragraph (Markdown needs the blank line)
        out.append(line)
    return wide("\n".join(out))


@cache
def lm_rows(root: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None, str | None]:
    """Rows of the committed language-model run (``dk run lm``), its teacher entry and baseline arm."""
    path = root / "benchmarks" / "runs" / "lm" / "results.json"
    if not path.is_file():
        return [], None, None
    from darkknowledge.commands import lm_config
    from darkknowledge.runs.lm_report import lm_rows as rows_of
    from darkknowledge.runs.lm_run import baseline_arm

    results = json.loads(path.read_text(encoding="utf-8"))["models"]
    base = baseline_arm(lm_config("lm"))
    teacher = next((e for e in results if e.get("role") == "teacher"), None)
    return rows_of(results, base), teacher, base


def lm_table(root: Path, loss: str | None = None) -> str | None:
    """The language-model run's table (only ``loss``'s arms and the student alone, when given)."""
    from darkknowledge.runs.lm_report import table_lines, verdicts

    rows, teacher, base = lm_rows(root)
    if loss is not None:
        mine = [r for r in rows if str(r["method"]).split("(")[0] == loss]
        if not mine:
            return None
        rows = [r for r in rows if r["arm"] == base and r not in mine] + mine
    if not rows:
        return None
    return wide("\n".join(table_lines(rows, teacher))) + "\n" + "\n".join(verdicts(rows, base)) + "\n"
