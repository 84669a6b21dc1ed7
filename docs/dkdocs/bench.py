"""The benchmark pages: every committed suite's tables and figures, and the committed run reports.

Nothing is copied by hand: the overview renders each suite's rows
(``benchmarks/results/SUITE/tables/SUITE.json``) with the renderer of README's tables, each suite
page is the full table file that ``dk bench SUITE --tables`` wrote, with its two figures, and the
runs page takes the headline of each ``benchmarks/runs/*/report.md`` and renders the
language-model run from its ``results.json``.
"""

from __future__ import annotations

from pathlib import Path

from darkknowledge.bench import markdown
from dkdocs import measured

PROTOCOL = """Every table follows one protocol: several seeds, mean ± sample std; the headline is the
**last**-epoch test accuracy (the best epoch, where shown, is selected on a validation split); the
student alone (`ce`) trains with the same budget and, per seed, from the same initialisation as each
distilled student; Δ columns are paired differences by seed with a 95% t-interval; costs (training
seconds, teacher or cache seconds, added parameters) sit beside the accuracy. Cells that cannot run
(a loss that needs feature maps on an MLP student) are `n/a` with the reason."""


def suite_names(root: Path) -> list[str]:
    """The committed suites, in the order of the overview (``cpu`` first)."""
    found = list(measured.suites(root))
    return sorted(found, key=lambda s: (s != "cpu", s))


def _figures(root: Path, suite: str) -> dict[str, Path]:
    folder = root / "benchmarks" / "results" / suite / "tables"
    return {p.name: p for p in sorted(folder.glob(f"{suite}-*.png"))}


def overview(root: Path) -> str:
    out = [
        "# Benchmarks",
        "",
        "The measured tables of darkknowledge's committed benchmark suites, rendered from the "
        "per-cell results in `benchmarks/results/` when this site is built (the same rows and renderer as "
        "README's tables). `dk bench SUITE` reruns a suite (cells already finished are skipped) and "
        "`dk bench SUITE --tables` rewrites its tables.",
        "",
        PROTOCOL,
        "",
        "The [committed runs](runs.md) (`dk run RECIPE`) and the language-model run are on their own page.",
        "",
    ]
    for suite in suite_names(root):
        rows = measured.suites(root)[suite]
        out += [
            f"## Suite `{suite}`",
            "",
            measured.suite_description(root, suite),
            "",
            f"Full tables (best-on-validation column, per-seed values, every model a scheme trains, n/a reasons) "
            f"and figures: [suite `{suite}`]({suite}.md). Rerun: `dk bench {suite} --jobs 2 --results "
            f"benchmarks/results/{suite}`.",
            "",
            measured.wide(markdown.to_markdown_compact(rows)),
        ]
    return "\n".join(out).rstrip() + "\n"


def suite_page(root: Path, suite: str) -> str:
    text = (root / "benchmarks" / "results" / suite / "tables" / f"{suite}.md").read_text(encoding="utf-8")
    lines = text.rstrip("\n").splitlines()
    head, body = (lines[0], lines[1:]) if lines and lines[0].startswith("# ") else (f"# Suite `{suite}`", lines)
    figures = _figures(root, suite)
    out = [
        head,
        "",
        f"Written by `dk bench {suite} --tables --results benchmarks/results/{suite}` from the committed "
        "per-cell results; the [overview](index.md) shows the compact table.",
        "",
        measured.wide("\n".join(body)),
    ]
    if figures:
        out += ["## Figures", ""] + [f"![{name}]({name})" for name in figures] + [""]
    return "\n".join(out)


def runs_page(root: Path) -> str:
    out = [
        "# Runs",
        "",
        "Committed reports of `dk run RECIPE` (`benchmarks/runs/RECIPE/report.md`): each run's "
        "headline table and verdict, as the run wrote them. A run trains, per seed, the student alone and the "
        "distilled student from the same initialisation.",
        "",
    ]
    folder = root / "benchmarks" / "runs"
    for report in sorted(folder.glob("*/report.md")):
        recipe = report.parent.name
        if recipe == "lm":
            continue
        out += [f"## `{recipe}`", "", measured.run_report(root, recipe) or ""]
    lm = measured.lm_table(root)
    if lm:
        out += [
            "## Language models",
            "",
            "`dk run lm` (`benchmarks/runs/lm/results.json`): SmolLM2-135M-Instruct "
            "distilled into a 3.4M-parameter Llama student with token-level divergences, from the full "
            "distribution and from sparse (top-k, sampled) caches.",
            "",
            lm,
        ]
    return "\n".join(out).rstrip() + "\n"


def pages(root: Path) -> dict[str, str | Path]:
    """Every generated benchmark page (Markdown) and figure (a path to copy)."""
    out: dict[str, str | Path] = {"benchmarks/index.md": overview(root), "benchmarks/runs.md": runs_page(root)}
    for suite in suite_names(root):
        out[f"benchmarks/{suite}.md"] = suite_page(root, suite)
        for name, path in _figures(root, suite).items():
            out[f"benchmarks/{name}"] = path
    return out
